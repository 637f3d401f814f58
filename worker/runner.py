"""Train one run: claim it, train through models.core.train with a callback that writes each epoch's
metrics row and checks for cancellation, record artifacts, finish. Idempotent: a redelivered task
finds the run claimed (and skips) or stale (and resumes from the last checkpoint)."""

from __future__ import annotations

import json
import logging
import threading
import traceback
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from models.contract.config import BuiltinDataset, DatasetConfig, FolderDataset, RunConfig
from models.contract.onnx_model import sha256_file
from service.api.runs import service as runs
from service.store.db import session_scope
from service.store.orm import ArtifactRow, DatasetRow, ModelRow, RunRow, RunStatus, utcnow
from service.store.settings import Settings

log = logging.getLogger("h2t.worker")


class ExportFailed(Exception):
    """Training finished but the ONNX export or its check failed: the run fails, clearly."""


class ClaimLost(Exception):
    """Another worker took the run over (this one was declared dead); stop without writing."""


def run_dir(settings: Settings, run_id: str) -> Path:
    return settings.artifact_dir / "runs" / run_id


class Heartbeat(threading.Thread):
    """Refreshes the claim every interval while training runs, whatever the epoch length."""

    def __init__(self, settings: Settings, run_id: str, token: str) -> None:
        super().__init__(name=f"heartbeat-{run_id}", daemon=True)
        self.settings, self.run_id, self.token = settings, run_id, token
        self.stopped = threading.Event()
        self.lost = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.settings.heartbeat_interval_s):
            try:
                with session_scope(self.settings.database_url) as session:
                    if not runs.heartbeat(session, self.run_id, self.token, utcnow()):
                        self.lost.set()
                        return
            except Exception:  # a blip of the database: the next beat tries again
                log.exception("heartbeat failed", extra={"run_id": self.run_id})


def _checkpoint_artifacts(settings: Settings, out_dir: Path) -> list[tuple[str, str, int, str]]:
    """(kind, path relative to the artifact dir, size, sha256) of the run's stage checkpoints."""
    found = []
    for stage in ("stage1", "stage2"):
        path = out_dir / stage / "checkpoint.pt"
        if path.exists():
            found.append((f"{stage}_checkpoint", str(path.relative_to(settings.artifact_dir)), path.stat().st_size,
                          sha256_file(path)))
    return found


def _upsert_artifact(session, run_id: str, kind: str, path: str, size_bytes: int, sha256: str) -> None:
    row = session.query(ArtifactRow).filter_by(run_id=run_id, kind=kind).first() or ArtifactRow(
        run_id=run_id, kind=kind)
    row.path, row.size_bytes, row.sha256 = path, size_bytes, sha256
    session.add(row)


STOP_REQUESTED = threading.Event()  # set by the worker's SIGTERM handler: stop after the next checkpoint


def train_run(run_id: str, settings: Settings, worker_name: str,
              requeue: Callable[[str], None] = lambda run_id: None) -> str:
    """The task body. Returns what happened: skipped, succeeded, cancelled, failed, requeued or lost.

    `requeue` sends the run to the broker again; it is called when this worker stops (SIGTERM)
    after checkpointing, once the run is back to queued in the store."""
    token = str(uuid.uuid4())
    with session_scope(settings.database_url) as session:
        now = utcnow()
        if not runs.claim(session, run_id, token, worker_name, now,
                          now - timedelta(seconds=settings.heartbeat_timeout_s)):
            log.info("run %s is not claimable (taken, finished or cancelled): skipped", run_id,
                     extra={"run_id": run_id})
            return "skipped"
        run = session.get(RunRow, run_id)
        config = RunConfig.model_validate(run.config)
        dataset_row = session.get(DatasetRow, run.dataset_id)
        spec: DatasetConfig = (FolderDataset if dataset_row.kind == "archive" else BuiltinDataset).model_validate(
            dataset_row.spec)
        stage1_from = run.stage1_from
        first_stage = 2 if stage1_from else 1
        runs.set_stage(session, run_id, token, first_stage, 0,
                       config.stage2.epochs if stage1_from else config.stage1.epochs)
    log.info("claimed run %s (attempt by %s)", run_id, worker_name, extra={"run_id": run_id})

    beat = Heartbeat(settings, run_id, token)
    beat.start()
    try:
        outcome = _train(run_id, settings, token, config, spec, stage1_from, beat, requeue)
    finally:
        beat.stopped.set()
    log.info("run %s %s", run_id, outcome, extra={"run_id": run_id})
    return outcome


def _train(run_id: str, settings: Settings, token: str, config: RunConfig, spec: DatasetConfig,
           stage1_from: str | None, beat: Heartbeat, requeue: Callable[[str], None]) -> str:
    from models.core.data import load_dataset
    from models.core.export import export_and_calibrate
    from models.core.train import TrainingCancelled, TrainingInterrupted, resolve_device, train_two_stage

    def on_epoch(m) -> None:
        if beat.lost.is_set():
            raise ClaimLost
        with session_scope(settings.database_url) as session:
            status = runs.record_epoch(session, run_id, token, m.model_dump())
            if status is None:
                raise ClaimLost
            if m.stage == 1 and m.epoch == m.epochs:
                runs.set_stage(session, run_id, token, 2, 0, config.stage2.epochs)
        if status == RunStatus.cancelling:
            raise TrainingCancelled

    out_dir = run_dir(settings, run_id)
    served = None
    artifacts: list[tuple[str, str, int, str]] = []
    try:
        dataset = load_dataset(spec, settings.data_root)
        result = train_two_stage(dataset, config, out_dir, resolve_device(), on_epoch,
                                 run_dir(settings, stage1_from) if stage1_from else None, STOP_REQUESTED.is_set)
        try:
            served = export_and_calibrate(result.model, dataset, result.groups, out_dir / "model.onnx")
        except Exception as exc:
            raise ExportFailed(f"ONNX export failed: {type(exc).__name__}: {exc}") from exc
        artifacts = _checkpoint_artifacts(settings, out_dir)
        status, error = RunStatus.succeeded, None
    except ClaimLost:
        return "lost"
    except TrainingInterrupted as exc:
        with session_scope(settings.database_url) as session:
            send_again = runs.release(session, run_id, token)
        if send_again:
            requeue(run_id)  # after the commit, so the next worker finds it queued
        log.warning("run %s requeued: %s", run_id, exc, extra={"run_id": run_id})
        return "requeued"
    except TrainingCancelled:
        status, error = RunStatus.cancelled, None
    except Exception as exc:  # the run failed, the worker carries on with the next one
        log.error("run %s failed:\n%s", run_id, traceback.format_exc(), extra={"run_id": run_id})
        status, error = RunStatus.failed, str(exc) if isinstance(exc, ExportFailed) else f"{type(exc).__name__}: {exc}"
    with session_scope(settings.database_url) as session:
        if served is not None and status == RunStatus.succeeded:
            # the model row and every artifact are committed with the run's success, or not at all
            _register_model(session, settings, run_id, served)
            for artifact in artifacts:
                _upsert_artifact(session, run_id, *artifact)
        if not runs.finish(session, run_id, token, status, error):
            session.rollback()
            return "lost"
    return status.value


def _register_model(session, settings: Settings, run_id: str, served) -> None:
    """The model row and its ONNX artifact, committed with the run's success."""
    export = served.export
    rel = str(export.path.relative_to(settings.artifact_dir))
    row = session.get(ModelRow, run_id) or ModelRow(run_id=run_id)
    row.onnx_path, row.sha256, row.size_bytes = rel, export.sha256, export.size_bytes
    row.parity_max_abs_diff, row.parity_images = export.parity_max_abs_diff, export.parity_images
    row.input_spec = json.loads(served.spec.to_metadata()["h2t.input"])
    row.class_names, row.groups = list(served.spec.class_names), list(served.spec.groups)
    row.calibration = served.calibration
    session.add(row)
    _upsert_artifact(session, run_id, "onnx", rel, export.size_bytes, export.sha256)
