"""Reproduce the paper's CIFAR-100-LT table and run the paired H2T-vs-DR experiment.

For each imbalance ratio: one full run (stage 1, then stage 2 with rho 0 = DR/cRT), and stage 2 with
H2T (rho 0.25) on the same stage-1 checkpoint. At IR 100 also the paired experiment (rho 0 and 0.25,
several stage-2 seeds on one stage-1 checkpoint) and, optionally, the fusing-ratio sweep.
Every figure is the LAST epoch on the test set; nothing is selected on it.

Runs `h2t train` jobs as subprocesses, several at once (a GPU has room for many ResNet-32 jobs).

  python benchmarks/reproduce_cifar100_lt.py --out runs/repro               # the full protocol
  python benchmarks/reproduce_cifar100_lt.py --out /tmp/smoke --stage1-epochs 2 --stage2-epochs 1 \
      --irs 100 --paired-seeds 2                                             # smoke check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from models.contract.layout import RunFolder  # noqa: E402

IMBALANCE_FACTOR = {200: 0.005, 100: 0.01, 50: 0.02}
PAPER = {  # CIFAR-100-LT top-1 %, ResNet-32 (H2T paper, AAAI 2024)
    "ce": {200: 35.99, 100: 39.55, 50: 45.40},
    "dr": {200: 41.73, 100: 45.68, 50: 50.86},
    "h2t": {200: 43.95, 100: 47.73, 50: 52.95},
}
PAPER_RHO_SWEEP = dict(zip([round(0.1 * i, 1) for i in range(11)],
                           [45.68, 47.11, 47.58, 47.73, 47.59, 47.17, 46.50, 46.05, 45.52, 44.39, 43.57], strict=True))


@dataclass
class Job:
    name: str
    ir: int
    out: Path
    overrides: list[str]
    after: str | None = None  # name of the job whose stage 1 this one reuses
    info: dict = field(default_factory=dict)

    @property
    def folder(self) -> RunFolder:
        """What `h2t train --out` writes."""
        return RunFolder(self.out)


def plan(args: argparse.Namespace) -> list[Job]:
    """Jobs in priority order: every stage 1 first, then the headline stage-2 runs, then the rest."""
    common = [f"stage1.epochs={args.stage1_epochs}", f"stage2.epochs={args.stage2_epochs}",
              f"precision={args.precision}"]
    if args.stage1_epochs < 160:  # a short smoke run: scale the schedule down with it
        common += [f"stage1.warmup_epochs={min(5, args.stage1_epochs)}", "stage1.milestones=[]"]

    def job(ir: int, method: str, seed: int, rho: float, name: str) -> Job:
        stage2 = ["stage2.method=crt", "stage2.rho=0"] if method == "dr" else ["stage2.method=h2t", f"stage2.rho={rho}"]
        first = f"ir{ir}-dr-s0"
        return Job(f"ir{ir}-{name}", ir, args.out / f"ir{ir}" / name.replace("-", "_"),
                   common + stage2 + [f"seed={seed}"], None if f"ir{ir}-{name}" == first else first,
                   {"method": method, "seed": seed, "rho": rho})

    irs = sorted(args.irs, key=lambda ir: ir != 100)  # IR 100 carries the paired experiment: start it first
    jobs = [job(ir, "dr", 0, 0.0, "dr-s0") for ir in irs]
    jobs += [job(ir, "h2t", 0, 0.25, "h2t-s0") for ir in irs]
    if 100 in args.irs:
        for seed in range(1, args.paired_seeds):
            jobs += [job(100, "dr", seed, 0.0, f"dr-s{seed}"), job(100, "h2t", seed, 0.25, f"h2t-s{seed}")]
        if args.rho_sweep:
            jobs += [job(100, "sweep", 0, rho, f"rho{rho}") for rho in [round(0.1 * i, 1) for i in range(1, 11)]]
    return jobs


def run_job(job: Job, jobs_by_name: dict[str, Job], args: argparse.Namespace) -> float:
    config = ROOT / "configs" / f"cifar100_lt_ir{job.ir}.yaml"
    cmd = [sys.executable, "-m", "h2t.cli", "train", "--config", str(config), "--out", str(job.out),
           "--data-root", str(args.data_root)]
    for item in job.overrides:
        cmd += ["--set", item]
    if job.after:
        cmd += ["--stage1-from", str(jobs_by_name[job.after].out)]
    if args.device:
        cmd += ["--device", args.device]
    job.out.mkdir(parents=True, exist_ok=True)
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": python_path, "OMP_NUM_THREADS": str(args.threads_per_job)}
    started = time.perf_counter()
    with open(job.out / "log.txt", "a") as log:
        subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - started


def execute(jobs: list[Job], args: argparse.Namespace) -> None:
    by_name = {j.name: j for j in jobs}
    done: set[str] = {j.name for j in jobs if j.folder.summary.exists()}
    pending = [j for j in jobs if j.name not in done]
    running: dict[Future, Job] = {}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        while pending or running:
            for job in [j for j in pending if j.after is None or j.after in done]:
                if len(running) >= args.jobs:
                    break
                pending.remove(job)
                running[pool.submit(run_job, job, by_name, args)] = job
            if not running:
                raise RuntimeError(f"jobs wait on stages that failed: {[j.name for j in pending]}")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                job = running.pop(future)
                try:
                    print(f"[{time.strftime('%H:%M:%S')}] {job.name} done in {future.result():.0f} s", flush=True)
                    done.add(job.name)
                except subprocess.CalledProcessError:
                    print(f"[{time.strftime('%H:%M:%S')}] {job.name} FAILED, see {job.out / 'log.txt'}", flush=True)
                    pending = [j for j in pending if j.after != job.name]


def _summary(job: Job) -> dict | None:
    path = job.folder.summary
    return json.loads(path.read_text()) if path.exists() else None


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def tables(jobs: list[Job], args: argparse.Namespace) -> str:
    by_name = {j.name: j for j in jobs}
    lines = ["## CIFAR-100-LT, ResNet-32, last epoch on the test set (top-1 %; ours / paper)", "",
             "| method | " + " | ".join(f"IR {ir}" for ir in args.irs) + " |",
             "|---|" + "---|" * len(args.irs)]
    for method, label in (("ce", "CE (stage 1, mixup)"), ("dr", "DR (rho = 0)"), ("h2t", "DR + H2T (rho = 0.25)")):
        cells = []
        for ir in args.irs:
            s = _summary(by_name[f"ir{ir}-{'dr' if method == 'ce' else method}-s0"])
            if s is None:
                cells.append(f"- / {PAPER[method][ir]:.2f}")
                continue
            value = s["stage1_last"]["top1"] if method == "ce" else s["stage2_last"]["top1"]
            cells.append(f"{_pct(value)} / {PAPER[method][ir]:.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    if 100 in args.irs:
        lines += ["", f"## Paired experiment at IR 100: one stage-1 checkpoint, {args.paired_seeds} stage-2 seeds "
                  "(mean ± std, %)", "",
                  "| stage 2 | n | top-1 | many | medium | few | ECE | ECE many | ECE medium | ECE few |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for method in ("dr", "h2t"):
            rows = [s["stage2_last"] for seed in range(args.paired_seeds)
                    if (s := _summary(by_name[f"ir100-{method}-s{seed}"])) is not None]
            if not rows:
                continue
            cells = []
            for key in ("top1", "many", "medium", "few", "ece", "ece_many", "ece_medium", "ece_few"):
                values = [100 * r[key] for r in rows]
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{statistics.mean(values):.2f} ± {std:.2f}")
            label = "DR (rho 0)" if method == "dr" else "H2T (rho 0.25)"
            lines.append(f"| {label} | {len(rows)} | " + " | ".join(cells) + " |")
        if args.rho_sweep:
            lines += ["", "## Fusing ratio at IR 100 (stage-2 seed 0; top-1 / many / few %, paper top-1)", "",
                      "| rho | top-1 | many | medium | few | ECE | paper top-1 |", "|---|---|---|---|---|---|---|"]
            for rho in sorted(PAPER_RHO_SWEEP):
                s = _summary(by_name["ir100-dr-s0" if rho == 0 else f"ir100-rho{rho}"])
                if s is None:
                    continue
                r = s["stage2_last"]
                lines.append(f"| {rho} | {_pct(r['top1'])} | {_pct(r['many'])} | {_pct(r['medium'])} | "
                             f"{_pct(r['few'])} | {_pct(r['ece'])} | {PAPER_RHO_SWEEP[rho]:.2f} |")
    return "\n".join(lines)


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """What every study of `h2t train` jobs on CIFAR-100-LT takes: where, which ratios, how to run the jobs."""
    parser.add_argument("--out", type=Path, required=True)
    default_root = Path(os.environ.get("H2T_DATA_ROOT", ROOT.parent / "shared" / "data"))
    parser.add_argument("--data-root", type=Path, default=default_root)
    parser.add_argument("--irs", type=int, nargs="+", default=[200, 100, 50], choices=sorted(IMBALANCE_FACTOR))
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--device", help="passed to h2t train (default: cuda when present)")
    parser.add_argument("--jobs", type=int, default=1, help="training processes at once")
    parser.add_argument("--threads-per-job", type=int, default=max(1, (os.cpu_count() or 2)))
    parser.add_argument("--tables-only", action="store_true", help="print the tables of finished jobs")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_arguments(parser)
    parser.add_argument("--stage1-epochs", type=int, default=200)
    parser.add_argument("--stage2-epochs", type=int, default=10)
    parser.add_argument("--paired-seeds", type=int, default=3)
    parser.add_argument("--rho-sweep", action="store_true", help="also stage 2 at rho 0.1 ... 1.0 (IR 100)")
    args = parser.parse_args()
    jobs = plan(args)
    if not args.tables_only:
        execute(jobs, args)
    text = tables(jobs, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
