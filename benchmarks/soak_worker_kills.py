"""Soak: twenty tiny runs trained by real workers that keep being killed with SIGKILL at random points.

Builds a fresh PostgreSQL database (migrated by Alembic), runs the API in-process (its stale-run sweep
included) and `--workers` real `python -m h2t worker` processes on a private Redis queue, submits
`--runs` tiny runs (the test suite's: builtin digits, 3 + 2 epochs), and every few seconds (a random
delay, `--seed`) kills one worker with SIGKILL, preferring one that holds a run, and starts a
replacement, until every run is terminal or `--deadline-s` passes. Fast heartbeats (0.5 s, timeout
3 s, sweep 1 s, resend after 5 s) so a dead worker's run is requeued within seconds.

While it runs it samples every metric row's write time, so an epoch written twice (re-trained) shows;
afterwards it reads the store, the artifact files and the workers' logs and prints:

- lost: runs never terminal (still queued, or running with a live heartbeat) at the deadline;
- stuck: runs still running or cancelling with a heartbeat older than the timeout;
- duplicated: a run trained to success twice (two `succeeded` outcomes in the logs, or more than one
  model or artifact row of a kind), or more claims logged than the run's `attempts`;
- duplicated metric rows: rows of the same (run, stage, epoch); the database forbids them
  (`uq_metrics_run_stage_epoch`), so also epochs re-trained beyond the last checkpoint: a resume may
  re-train only the epoch its killed worker reported but had not yet checkpointed, i.e. at most one
  rewritten row per claim after the first;
- missing metric rows: a succeeded run lacking a (stage, epoch) row; incomplete: a succeeded run without
  its model, its three artifacts, or whose stored sha256 is not the file's;
- progress reset: a run whose (stage, epoch) went backwards between samples, or a succeeded run whose
  progress is not its last epoch of stage 2.

Exit status 1 when any of lost, stuck, duplicated, duplicated metric rows, re-trained beyond the
checkpoint, missing rows, incomplete or progress reset is non-zero. Failed runs (a run is failed after
`H2T_MAX_ATTEMPTS` lost workers; `--max-attempts` is set high so that is not what is measured) are
reported, not counted as errors.

  python benchmarks/soak_worker_kills.py                       # 20 runs, 2 workers, a kill every 3-10 s
  python benchmarks/soak_worker_kills.py --seed 7 --kill-every 1 4 --runs 30

Servers: H2T_TEST_PG_URL (default postgresql+psycopg://postgres@127.0.0.1:5432/test; the script
creates and drops its own database next to it) and H2T_TEST_REDIS_URL (default
redis://127.0.0.1:6379/15; a queue of its own, deleted at the end).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import redis  # noqa: E402
import sqlalchemy as sa  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from models.contract.onnx_model import sha256_file  # noqa: E402
from service.api.app import create_app  # noqa: E402
from service.store.db import get_engine, session_scope  # noqa: E402
from service.store.logs import JsonFormatter  # noqa: E402
from service.store.migrate import upgrade_head  # noqa: E402
from service.store.orm import TERMINAL, ArtifactRow, MetricRow, ModelRow, RunRow, RunStatus, utcnow  # noqa: E402
from service.store.settings import Settings  # noqa: E402
from tests.helpers import create_tiny_dataset, submit_run  # noqa: E402
from tests.integration.conftest import settings_env  # noqa: E402

PG_URL = os.environ.get("H2T_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("H2T_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
API_KEY = "soak-key"
TINY_KEYS = [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2)]  # (stage, epoch) of the tiny run's 3 + 2 epochs
ARTIFACT_KINDS = ("onnx", "stage1_checkpoint", "stage2_checkpoint")
CLAIMED = re.compile(r"claimed run ([0-9a-f-]{36})")
OUTCOME = re.compile(r"\brun ([0-9a-f-]{36}) (succeeded|failed|cancelled|requeued|lost)\b")
SKIPPED = re.compile(r"run ([0-9a-f-]{36}) is not claimable")


@dataclass
class Worker:
    process: subprocess.Popen
    log_path: Path


@dataclass
class Observed:
    """What the sampler saw while the soak ran."""

    writes: dict[tuple[str, int, int], set] = field(default_factory=lambda: defaultdict(set))  # key -> created_at
    progress: dict[str, tuple[int, int]] = field(default_factory=dict)  # run -> (stage, epoch) last seen
    regressions: Counter = field(default_factory=Counter)  # run -> times its progress went backwards


def spawn_worker(env: dict[str, str], log_path: Path) -> Worker:
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "h2t", "worker"], cwd=REPO, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
    return Worker(process, log_path)


def kill(worker: Worker) -> None:
    if worker.process.poll() is None:
        worker.process.send_signal(signal.SIGKILL)
    worker.process.wait()


def sample(database_url: str, observed: Observed) -> dict[str, RunRow]:
    """The runs now, and every metric row's write time added to what was seen."""
    with session_scope(database_url) as session:
        for run_id, stage, epoch, written in session.execute(
                sa.select(MetricRow.run_id, MetricRow.stage, MetricRow.epoch, MetricRow.created_at)):
            observed.writes[(run_id, stage, epoch)].add(written)
        runs = {row.id: row for row in session.scalars(sa.select(RunRow))}
    for run_id, row in runs.items():
        if row.stage is not None:
            now, last = (row.stage, row.epoch), observed.progress.get(run_id)
            observed.regressions[run_id] += last is not None and now < last
            observed.progress[run_id] = now
    return runs


def pick_victim(workers: list[Worker], runs: dict[str, RunRow], rng: random.Random) -> Worker:
    """A worker that holds a running run when there is one (a kill there tests recovery), else any."""
    busy_pids = {int(row.worker.rsplit(":", 1)[1]) for row in runs.values()
                 if row.status == RunStatus.running and row.worker and row.worker.rsplit(":", 1)[1].isdigit()}
    busy = [w for w in workers if w.process.pid in busy_pids]
    return rng.choice(busy or workers)


def parse_logs(paths: list[Path]) -> tuple[Counter, Counter, Counter]:
    """Claims, outcomes (run, outcome) and skipped deliveries per run, from every worker's log."""
    claims, outcomes, skipped = Counter(), Counter(), Counter()
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            try:
                message = json.loads(line).get("message", "")
            except (json.JSONDecodeError, AttributeError):
                message = line
            if m := CLAIMED.search(message):
                claims[m.group(1)] += 1
            elif m := SKIPPED.search(message):
                skipped[m.group(1)] += 1
            elif m := OUTCOME.search(message):
                outcomes[(m.group(1), m.group(2))] += 1
    return claims, outcomes, skipped


def audit(settings: Settings, run_ids: list[str], observed: Observed, logs: list[Path]) -> dict[str, object]:
    now = utcnow()
    stale_before = now - timedelta(seconds=settings.heartbeat_timeout_s)
    claims, outcomes, skipped = parse_logs(logs)
    with session_scope(settings.database_url) as session:
        runs = {row.id: row for row in session.scalars(sa.select(RunRow).where(RunRow.id.in_(run_ids)))}
        metric_keys = defaultdict(list)
        for run_id, stage, epoch in session.execute(sa.select(MetricRow.run_id, MetricRow.stage, MetricRow.epoch)):
            metric_keys[run_id].append((stage, epoch))
        models = Counter(session.scalars(sa.select(ModelRow.run_id)))
        artifacts = defaultdict(list)
        for row in session.scalars(sa.select(ArtifactRow)):
            artifacts[row.run_id].append(row)
        model_rows = {row.run_id: row for row in session.scalars(sa.select(ModelRow))}

    status = Counter(row.status for row in runs.values())
    stuck = [r for r in runs.values() if r.status in (RunStatus.running, RunStatus.cancelling)
             and r.heartbeat_at is not None and r.heartbeat_at < stale_before]
    lost = [r for r in runs.values() if r.status not in TERMINAL and r not in stuck]

    duplicated, dup_metric_rows, retrained, beyond, missing, incomplete = set(), 0, 0, 0, 0, set()
    last_epoch = (2, TINY_KEYS[-1][1], TINY_KEYS[-1][1])  # (stage, epoch, total_epochs) of a finished run
    progress_reset = {r for r, row in runs.items() if observed.regressions[r]
                      or (row.status == RunStatus.succeeded and (row.stage, row.epoch, row.total_epochs) != last_epoch)}
    for run_id, row in runs.items():
        if outcomes[(run_id, "succeeded")] > 1 or models[run_id] > 1 or claims[run_id] > row.attempts:
            duplicated.add(run_id)
        kinds = Counter(a.kind for a in artifacts[run_id])
        if any(n > 1 for n in kinds.values()):
            duplicated.add(run_id)
        keys = Counter(metric_keys[run_id])
        dup_metric_rows += sum(n - 1 for n in keys.values() if n > 1)
        rewrites = sum(len(observed.writes[(run_id, s, e)]) - 1 for s, e in keys if observed.writes[(run_id, s, e)])
        retrained += rewrites
        beyond += max(0, rewrites - max(0, row.attempts - 1))
        if row.status == RunStatus.succeeded:
            missing += sum(1 for k in TINY_KEYS if k not in keys)
            model = model_rows.get(run_id)
            if model is None or sorted(kinds) != sorted(ARTIFACT_KINDS):
                incomplete.add(run_id)
                continue
            for artifact in artifacts[run_id]:
                path = settings.artifacts.resolve(artifact.path)
                if not path.exists() or sha256_file(path) != artifact.sha256:
                    incomplete.add(run_id)
            if model.sha256 != next(a.sha256 for a in artifacts[run_id] if a.kind == "onnx"):
                incomplete.add(run_id)
    fenced = sum(n for (_, outcome), n in outcomes.items() if outcome == "lost")
    return {
        "runs": runs, "status": status, "lost": lost, "stuck": stuck, "duplicated": duplicated,
        "dup_metric_rows": dup_metric_rows, "retrained": retrained, "beyond": beyond, "missing": missing,
        "incomplete": incomplete, "progress_reset": progress_reset,
        "resumes": sum(max(0, r.attempts - 1) for r in runs.values()),
        "max_attempts_seen": max((r.attempts for r in runs.values()), default=0), "fenced": fenced,
        "skipped": sum(skipped.values()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2, help="workers alive at once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kill-every", type=float, nargs=2, default=(3.0, 10.0), metavar=("MIN_S", "MAX_S"),
                        help="a kill after a delay drawn uniformly from this range, then the next")
    parser.add_argument("--max-attempts", type=int, default=30, help="H2T_MAX_ATTEMPTS of the workers and the API")
    parser.add_argument("--deadline-s", type=float, default=600, help="stop waiting for the runs after this long")
    parser.add_argument("--keep", action="store_true", help="keep the database, the artifacts and the worker logs")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    started = time.monotonic()
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    db_name = f"h2t_soak_{uuid.uuid4().hex[:12]}"
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{db_name}"'))
    database_url = admin.url.set(database=db_name).render_as_string(hide_password=False)
    workdir = Path(tempfile.mkdtemp(prefix="h2t-soak-"))
    queue = f"h2t-soak-{uuid.uuid4().hex[:8]}"
    settings = Settings(database_url=database_url, broker_url=REDIS_URL, artifact_dir=workdir / "artifacts",
                        api_keys=(API_KEY,), queue_name=queue, heartbeat_interval_s=0.5, heartbeat_timeout_s=3.0,
                        sweep_interval_s=1.0, resend_after_s=5.0, max_attempts=args.max_attempts)
    env = {**settings_env(settings), "H2T_MAX_ATTEMPTS": str(settings.max_attempts)}
    workers: list[Worker] = []
    logs: list[Path] = []
    observed = Observed()
    kills = crashed = 0

    def start_worker() -> None:
        path = workdir / f"worker-{len(logs)}.log"
        logs.append(path)
        workers.append(spawn_worker(env, path))

    api_log = logging.FileHandler(workdir / "api.log")  # the in-process API's sweep logs each resend
    api_log.setFormatter(JsonFormatter())
    logging.getLogger("h2t").addHandler(api_log)
    logging.getLogger("h2t").setLevel(logging.INFO)
    try:
        upgrade_head(database_url)
        with TestClient(create_app(settings), headers={"X-API-Key": API_KEY}) as client:
            dataset = create_tiny_dataset(client)
            run_ids = [submit_run(client, dataset)["id"] for _ in range(args.runs)]
            for _ in range(args.workers):
                start_worker()
            next_kill = time.monotonic() + rng.uniform(*args.kill_every)
            deadline = started + args.deadline_s
            while time.monotonic() < deadline:
                runs = sample(database_url, observed)
                if all(runs[r].status in TERMINAL for r in run_ids):
                    break
                for worker in [w for w in workers if w.process.poll() is not None]:  # died on its own
                    crashed += 1
                    workers.remove(worker)
                    start_worker()
                if time.monotonic() >= next_kill:
                    victim = pick_victim(workers, runs, rng)
                    kill(victim)
                    kills += 1
                    workers.remove(victim)
                    start_worker()
                    next_kill = time.monotonic() + rng.uniform(*args.kill_every)
                time.sleep(0.1)
            sample(database_url, observed)
            elapsed = time.monotonic() - started
            for worker in workers:
                kill(worker)
            workers.clear()
            result = audit(settings, run_ids, observed, logs)
    finally:
        for worker in workers:
            kill(worker)
        get_engine(database_url).dispose()
        logging.getLogger("h2t").removeHandler(api_log)
        api_log.close()
        client_redis = redis.Redis.from_url(REDIS_URL)
        for key in client_redis.scan_iter(match=f"*{queue}*"):
            client_redis.delete(key)
        if not args.keep:
            with admin.connect() as connection:
                connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))
            shutil.rmtree(workdir, ignore_errors=True)
        admin.dispose()

    status = result["status"]
    errors = {
        "lost (never terminal)": len(result["lost"]),
        "stuck (running, heartbeat stale)": len(result["stuck"]),
        "duplicated (trained to success twice, or more claims than attempts)": len(result["duplicated"]),
        "duplicated metric rows (same run, stage, epoch)": result["dup_metric_rows"],
        "epochs re-trained beyond the last checkpoint": result["beyond"],
        "missing metric rows (of succeeded runs)": result["missing"],
        "incomplete succeeded runs (model, artifacts, sha256)": len(result["incomplete"]),
        "progress went backwards, or a succeeded run not at its last epoch": len(result["progress_reset"]),
    }
    rows = [
        ("runs submitted", args.runs),
        ("succeeded", status[RunStatus.succeeded]),
        (f"failed (after {args.max_attempts} lost workers, or an error)", status[RunStatus.failed]),
        *errors.items(),
        ("worker kills (SIGKILL)", kills),
        ("workers that exited on their own", crashed),
        ("resumes (claims after a run's first)", result["resumes"]),
        ("most claims of one run", result["max_attempts_seen"]),
        ("epochs re-trained after a resume (at most 1 per resume)", result["retrained"]),
        ("deliveries fenced out (claim lost while training)", result["fenced"]),
        ("deliveries skipped (run held or finished)", result["skipped"]),
        ("total time", f"{elapsed:.0f} s"),
    ]
    print(f"\nsoak: {args.runs} tiny runs, {args.workers} workers, a SIGKILL every "
          f"{args.kill_every[0]:g}-{args.kill_every[1]:g} s, seed {args.seed}, H2T_MAX_ATTEMPTS {args.max_attempts}\n")
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    bad = {name: n for name, n in errors.items() if n}
    failed = Counter((row.error or "").split(" (")[0] for row in result["runs"].values()
                     if row.status == RunStatus.failed)
    for error, n in failed.items():
        print(f"  failed: {n} x {error}")
    for run in (result["lost"] + result["stuck"]):
        print(f"  {run.id}: {run.status} stage {run.stage} epoch {run.epoch} attempts {run.attempts} "
              f"heartbeat {run.heartbeat_at}")
    for run_id in sorted(result["duplicated"] | result["incomplete"] | result["progress_reset"]):
        run = result["runs"][run_id]
        print(f"  {run_id}: {run.status} stage {run.stage} epoch {run.epoch}/{run.total_epochs} attempts "
              f"{run.attempts} (duplicated, incomplete or progress reset)")
    if args.keep:
        print(f"kept: database {db_name}, files and worker logs in {workdir}")
    if bad:
        print(f"FAILED: {bad}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
