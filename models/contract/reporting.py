"""Plain-text tables of evaluation results, shared by the CLI, the demo and the benchmarks."""

from __future__ import annotations

from models.contract.metrics import GROUP_NAMES, EpochMetrics, EvaluationReport, StepProgress


def pct(fraction: float | None, width: int = 0, digits: int = 2) -> str:
    """A fraction as a percentage right-aligned in `width`; "-" for a group without images (null)."""
    text = "-" if fraction is None else f"{100 * fraction:.{digits}f}"
    return f"{text:>{width}}"


def group_rows_table(
    groups: list[str], train_counts: list[int], test_counts: list[int],
    accuracy_ece: dict[str, tuple[float | None, float | None]],
) -> str:
    """One row per group ("overall" first): classes, training and test images, accuracy and ECE in %.

    `accuracy_ece` maps each of overall/many/medium/few to (accuracy, ece) as fractions."""
    lines = [f"{'group':<8} {'classes':>7} {'train imgs':>10} {'test imgs':>9} {'acc %':>7} {'ECE %':>7}"]
    for name in ("overall", *GROUP_NAMES):
        members = [i for i, g in enumerate(groups) if name == "overall" or g == name]
        accuracy, ece = accuracy_ece[name]
        lines.append(f"{name:<8} {len(members):>7} {sum(train_counts[i] for i in members):>10} "
                     f"{sum(test_counts[i] for i in members):>9} {pct(accuracy, 7)} {pct(ece, 7)}")
    return "\n".join(lines)


def group_table(report: EvaluationReport, train_counts: list[int], test_counts: list[int], groups: list[str]) -> str:
    """The per-group table of an evaluation report."""
    return group_rows_table(groups, train_counts, test_counts,
                            {name: (g.accuracy, g.ece) for name, g in report.groups.items()})


def epoch_line(m: EpochMetrics) -> str:
    return (f"stage {m.stage} epoch {m.epoch:>3}/{m.epochs} loss {m.loss:.4f} lr {m.lr:.5f} "
            f"top1 {pct(m.top1, 5)} many {pct(m.many, 5)} med {pct(m.medium, 5)} "
            f"few {pct(m.few, 5)} ECE {pct(m.ece, 5)} ({m.images_per_second:.0f} img/s)")


def duration(seconds: float) -> str:
    """3h05m, 12m40s or 9s."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def progress_line(p: StepProgress) -> str:
    return (f"stage {p.stage} epoch {p.epoch:>3}/{p.epochs} step {p.step}/{p.steps} "
            f"{p.images_per_second:.0f} img/s, stage ETA {duration(p.stage_eta_s)}, run ETA {duration(p.run_eta_s)}")
