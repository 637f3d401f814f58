"""Plain-text tables of evaluation results, shared by the CLI, the demo and the benchmarks."""

from __future__ import annotations

from models.metrics import GROUP_NAMES, EpochMetrics, EvaluationReport


def group_table(report: EvaluationReport, train_counts: list[int], groups: list[str]) -> str:
    """One row per group: classes, training images, test images, accuracy and ECE (percent)."""
    lines = [f"{'group':<8} {'classes':>7} {'train imgs':>10} {'test imgs':>9} {'acc %':>7} {'ECE %':>7}"]
    for name in ("overall", *GROUP_NAMES):
        members = [i for i, g in enumerate(groups) if name == "overall" or g == name]
        g = report.groups[name]
        lines.append(f"{name:<8} {len(members):>7} {sum(train_counts[i] for i in members):>10} {g.n:>9} "
                     f"{100 * g.accuracy:>7.2f} {100 * g.ece:>7.2f}")
    return "\n".join(lines)


def epoch_line(m: EpochMetrics) -> str:
    return (f"stage {m.stage} epoch {m.epoch:>3}/{m.epochs} loss {m.loss:.4f} lr {m.lr:.5f} "
            f"top1 {100 * m.top1:5.2f} many {100 * m.many:5.2f} med {100 * m.medium:5.2f} "
            f"few {100 * m.few:5.2f} ECE {100 * m.ece:5.2f} ({m.images_per_second:.0f} img/s)")
