"""The recipe study on CIFAR-100-LT: the paper's stage-1 recipe against a strong one, each followed by DR
(cRT) and by H2T in stage 2, with temperature scaling fitted on a validation split.

For each imbalance ratio, recipe and seed: one `h2t train` job trains stage 1 and DR, a second reuses its
stage 1 for H2T (rho 0.25). Every job holds out a validation split of CIFAR's unused balanced training
images (20 per class where the long-tailed subset left that many; extra labelled data, said so in the
table), which the training never sees. After training, each model is exported as a worker exports it,
with temperatures fitted on the validation split, and measured on the test split. Every figure is the
LAST epoch; nothing is selected on the test set. `--rho-check` also trains H2T at several fusing ratios
on the strong stage 1 at IR 100 and picks the ratio on the validation split.

  python benchmarks/recipe_study.py --out runs/study --irs 100 --seeds 3 --jobs 8        # on a GPU
  python benchmarks/recipe_study.py --out /tmp/study-smoke --irs 100 --stage1-epochs 2 \\
      --stage2-epochs 1                                                                   # smoke check
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from reproduce_cifar100_lt import PAPER, Job, add_job_arguments, execute  # noqa: E402

# The strong stage-1 recipe: PaCo's CIFAR training (Cui et al., ICCV 2021: AutoAugment's CIFAR policy and
# Cutout 16, weight decay 5e-4, 400 epochs of cosine decay after a 5-epoch warm-up) with the balanced softmax
# (Ren et al., NeurIPS 2020) as the loss and no mixup (PaCo uses none beside AutoAugment).
STRONG = ["stage1.epochs=400", "stage1.schedule=cosine", "stage1.warmup_epochs=5", "stage1.weight_decay=5e-4",
          "stage1.augment_policy=autoaugment_cifar", "stage1.cutout=16", "stage1.loss=balanced_softmax",
          "stage1.mixup_alpha=0"]
VALIDATION = ["validation.source=unused", "validation.per_class=20", "validation.calibration=class"]
RHO_CHECK = (0.1, 0.25, 0.4, 0.55)
GROUPS = ("overall", "many", "medium", "few")


def plan(args: argparse.Namespace) -> list[Job]:
    jobs: list[Job] = []
    for ir in sorted(args.irs, key=lambda ir: ir != 100):
        for recipe in args.recipes:
            for seed in range(args.seeds):
                common = [*VALIDATION, f"seed={seed}", f"precision={args.precision}",
                          f"stage2.epochs={args.stage2_epochs}", *(STRONG if recipe == "strong" else [])]
                if args.stage1_epochs is not None:  # a shorter stage 1 keeps the recipe's schedule shape
                    common += [f"stage1.epochs={args.stage1_epochs}",
                               f"stage1.warmup_epochs={min(5, args.stage1_epochs)}"]
                    if recipe == "paper":
                        common += ["stage1.milestones=[]"] if args.stage1_epochs < 160 else []
                if recipe == "strong" and args.sam:
                    common.append(f"stage1.sam_rho={args.sam}")
                base = f"ir{ir}-{recipe}-s{seed}"
                first = Job(f"{base}-dr", ir, args.out / f"ir{ir}" / recipe / f"s{seed}" / "dr",
                            [*common, "stage2.method=crt", "stage2.rho=0"], None,
                            {"recipe": recipe, "method": "dr", "seed": seed})
                jobs.append(first)
                rhos = RHO_CHECK if args.rho_check and ir == 100 and recipe == "strong" and seed == 0 else (0.25,)
                for rho in rhos:
                    name = "h2t" if rho == 0.25 else f"h2t-rho{rho}"
                    jobs.append(Job(f"{base}-{name}", ir, args.out / f"ir{ir}" / recipe / f"s{seed}" / name,
                                    [*common, "stage2.method=h2t", f"stage2.rho={rho}"], first.name,
                                    {"recipe": recipe, "method": "h2t" if rho == 0.25 else "rho", "seed": seed,
                                     "rho": rho}))
    return jobs


def calibrated(job: Job, data_root: Path, logit_adjustment: bool = False) -> dict | None:
    """The job's model exported with temperatures fitted on its validation split (cached in its folder); with
    `logit_adjustment`, a post-hoc logit adjustment fitted there first."""
    cache = job.out / ("calibration-adjusted.json" if logit_adjustment else "calibration.json")
    if cache.exists():
        return json.loads(cache.read_text())
    if not job.folder.summary.exists():
        return None
    import yaml

    from models.contract.config import LocalTrainConfig
    from models.core.data import load_dataset
    from models.core.export import export_finished_folder

    config = LocalTrainConfig.model_validate(yaml.safe_load(job.folder.config.read_text()))
    if logit_adjustment:
        config = config.model_copy(update={"validation": config.validation.model_copy(
            update={"logit_adjustment": True})})
    dataset = load_dataset(config.dataset, data_root, augment=config.augment, loader=config.loader,
                           validation=config.validation)
    with tempfile.TemporaryDirectory() as scratch:
        served = export_finished_folder(job.out, config, dataset, Path(scratch) / "model.onnx")
    report = served.calibration.model_dump(mode="json")
    cache.write_text(json.dumps(report))
    return report


def finished(jobs: list[Job], reports: dict[str, dict | None], ir: int, recipe: str, method: str) -> list[dict]:
    """The calibrated reports of the finished jobs of one table row (one per seed)."""
    return [reports[j.name] for j in jobs if j.ir == ir and j.info["recipe"] == recipe and j.info["method"] == method
            and reports[j.name] is not None]


def stage1_lengths(jobs: list[Job], ir: int, recipe: str) -> str:
    """The stage-1 epochs the finished jobs of a recipe trained (the table says when a run was shortened)."""
    import yaml

    lengths = {yaml.safe_load(j.folder.config.read_text())["stage1"]["epochs"] for j in jobs
               if j.ir == ir and j.info["recipe"] == recipe and j.folder.summary.exists()}
    return "/".join(str(n) for n in sorted(lengths)) or "-"


def stage1_alone(jobs: list[Job], ir: int, recipe: str) -> list[dict]:
    """The last-epoch metrics of each seed's stage 1 before any stage 2 (kept in the DR job's summary)."""
    return [s["stage1_last"] for j in jobs if j.ir == ir and j.info["recipe"] == recipe and j.info["method"] == "dr"
            and j.folder.summary.exists() and (s := json.loads(j.folder.summary.read_text()))["stage1_last"]]


def _mean(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def tables(jobs: list[Job], args: argparse.Namespace) -> str:
    reports = {job.name: calibrated(job, args.data_root) for job in jobs}
    lines = [f"Validation: {VALIDATION[1].split('=')[1]} unused balanced training images per class where left "
             "(extra labelled data the long-tailed benchmark does not give); temperatures per predicted class, "
             "shrunk towards the group's. Last epoch, test split.\n",
             "| IR | recipe | stage-1 epochs | stage 2 | seeds | top-1 % | many | medium | few | paper top-1 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for ir in args.irs:
        for recipe in args.recipes:
            epochs = stage1_lengths(jobs, ir, recipe)
            alone = stage1_alone(jobs, ir, recipe)
            cells = [_mean([m["top1"] for m in alone])] + [_mean([m[g] for m in alone]) for g in GROUPS[1:]]
            lines.append(f"| {ir} | {recipe} | {epochs} | none (stage 1 alone, uncalibrated) | {len(alone)} | "
                         f"{' | '.join(cells)} | |")
            for method in ("dr", "h2t"):
                done = finished(jobs, reports, ir, recipe, method)
                cells = [_mean([r["top1"] for r in done])]
                cells += [_mean([r["groups"][g]["accuracy"] for r in done]) for g in GROUPS[1:]]
                paper = PAPER["dr" if method == "dr" else "h2t"][ir] if recipe == "paper" else ""
                lines.append(f"| {ir} | {recipe} | {epochs} | {method.upper()} | {len(done)} | {' | '.join(cells)} "
                             f"| {paper} |")
    lines += ["", "ECE % on the test split without → with the fitted temperatures (mean over seeds):", "",
              "| IR | recipe | stage 2 | overall | many | medium | few | class-wise ECE overall |",
              "|---|---|---|---|---|---|---|---|"]
    for ir in args.irs:
        for recipe in args.recipes:
            for method in ("dr", "h2t"):
                done = finished(jobs, reports, ir, recipe, method)
                if not done:
                    continue

                def both(group: str, key: str = "ece", done: list[dict] = done) -> str:
                    before = statistics.mean(r["calibration_fit"]["test_before"][group][key] for r in done)
                    after = statistics.mean(r["groups"][group][key] for r in done)
                    return f"{100 * before:.2f} → {100 * after:.2f}"

                lines.append(f"| {ir} | {recipe} | {method.upper()} | " + " | ".join(both(g) for g in GROUPS)
                             + f" | {both('overall', 'classwise_ece')} |")
    adjusted = {job.name: calibrated(job, args.data_root, logit_adjustment=True)
                if reports[job.name] is not None and job.info["method"] in ("dr", "h2t") else None for job in jobs}
    lines += ["", "Post-hoc logit adjustment fitted on the validation split (tau for the best mean per-class "
              "validation accuracy), then the class temperatures; test split, %:", "",
              "| IR | recipe | stage 2 | tau | top-1 | many | medium | few | ECE | ECE many | ECE medium | ECE few |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for ir in args.irs:
        for recipe in args.recipes:
            for method in ("dr", "h2t"):
                done = finished(jobs, adjusted, ir, recipe, method)
                if not done:
                    continue
                taus = "/".join(f"{r['calibration_fit']['logit_adjustment_tau']:g}" for r in done)
                cells = [_mean([r["top1"] for r in done])]
                cells += [_mean([r["groups"][g]["accuracy"] for r in done]) for g in GROUPS[1:]]
                cells += [_mean([r["groups"][g]["ece"] for r in done]) for g in GROUPS]
                lines.append(f"| {ir} | {recipe} | {method.upper()} | {taus} | {' | '.join(cells)} |")
    rho_jobs = [j for j in jobs if j.ir == 100 and j.info["recipe"] == "strong" and j.info["seed"] == 0
                and j.info.get("rho") is not None and reports[j.name] is not None]
    if rho_jobs:
        lines += ["", "Fusing ratio on the strong stage 1 at IR 100 (seed 0), chosen on the validation split "
                  "(mean per-class accuracy, before scaling, which does not change it):", "",
                  "| rho | validation accuracy % | test top-1 % |", "|---|---|---|"]
        scored = [(j.info["rho"], reports[j.name]["calibration_fit"]["validation_before"]["overall"]["accuracy"],
                   reports[j.name]["top1"]) for j in rho_jobs]
        best = max(scored, key=lambda s: s[1])[0]
        lines += [f"| {rho}{' (chosen)' if rho == best else ''} | {100 * val:.2f} | {100 * test:.2f} |"
                  for rho, val, test in sorted(scored)]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_arguments(parser)
    parser.add_argument("--recipes", nargs="+", default=["paper", "strong"], choices=["paper", "strong"])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--stage1-epochs", type=int, help="override both recipes' stage-1 length (smoke runs, or "
                        "a run that must fit a budget: the tables show the length trained)")
    parser.add_argument("--stage2-epochs", type=int, default=10)
    parser.add_argument("--sam", type=float, default=0.0, help="SAM rho for the strong recipe's stage 1 (0: off)")
    parser.add_argument("--rho-check", action="store_true", help="H2T at rho 0.1/0.25/0.4/0.55 on the strong stage 1 "
                        "at IR 100, chosen on the validation split")
    args = parser.parse_args()
    jobs = plan(args)
    if not args.tables_only:
        execute(jobs, args)
    text = tables(jobs, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text + "\n")
    print(text)
    unfinished = [job.name for job in jobs if not job.folder.summary.exists()]
    if unfinished:
        print(f"not finished: {', '.join(unfinished)}", file=sys.stderr)
    return 1 if unfinished else 0


if __name__ == "__main__":
    sys.exit(main())
