"""Train one run: claim it, train through models.core.train with a callback that writes each epoch's
metrics row and checks for cancellation, export, and record the outcome, all through the run state
machine of service.store.runs. Idempotent: a redelivered task finds the run claimed (and skips) or
stale (and resumes from the last checkpoint)."""

from __future__ import annotations

import enum
import logging
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import sqlalchemy.exc
from sqlalchemy.orm import Session

from models.contract.layout import ONNX_KIND, STAGES, ArtifactLayout, RunFolder, checkpoint_kind
from models.contract.metrics import EpochMetrics
from models.contract.onnx_model import sha256_file
from service.store import runs
from service.store.db import session_scope
from service.store.orm import RunStatus, utcnow
from service.store.runs import ClaimedRun, ExportedModel, StoredFile
from service.store.settings import Settings

log = logging.getLogger("h2t.worker")
T = TypeVar("T")


class Outcome(enum.StrEnum):
    """What one delivery of a training task did."""

    skipped = "skipped"  # another worker holds the run, or it is finished or cancelled
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    requeued = "requeued"  # this worker is stopping: checkpointed and sent back to the queue
    lost = "lost"  # another worker took the run over; nothing was written


class ExportFailed(Exception):
    """Training finished but the ONNX export or its check failed: the run fails, clearly."""


class ClaimLost(Exception):
    """Another worker took the run over (this one was declared dead); stop without writing."""


STORE_RETRY_DELAYS_S = (1.0, 2.0, 4.0, 8.0, 16.0)  # about 30 s in all, well inside the heartbeat timeout


def in_store(settings: Settings, work: Callable[[Session], T], what: str) -> T:
    """One unit of work on the store (committed when `work` returns), retried with backoff while the
    database is unreachable: a blip must neither drop a delivery nor cost a training attempt. The
    last failure propagates (the run keeps its checkpoint)."""
    for delay in STORE_RETRY_DELAYS_S:
        try:
            with session_scope(settings.database_url) as session:
                return work(session)
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError):
            log.warning("the store is unreachable while %s; trying again in %.0f s", what, delay)
            time.sleep(delay)
    with session_scope(settings.database_url) as session:  # the last try: its failure propagates
        return work(session)


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


def _stored(artifacts: ArtifactLayout, kind: str, path: Path) -> StoredFile:
    return StoredFile(kind, artifacts.relative(path), path.stat().st_size, sha256_file(path))


def _checkpoint_files(artifacts: ArtifactLayout, folder: RunFolder) -> list[StoredFile]:
    return [_stored(artifacts, checkpoint_kind(stage), folder.checkpoint(stage))
            for stage in STAGES if folder.checkpoint(stage).exists()]


def train_run(run_id: str, settings: Settings, worker_name: str, stop: threading.Event,
              requeue: Callable[[str], None] = lambda run_id: None) -> Outcome:
    """The task body. `stop` is set when this worker must shut down (SIGTERM): training stops after its
    next checkpoint, the run goes back to queued and `requeue` sends it to the broker again."""
    token = str(uuid.uuid4())

    def claim(session: Session) -> ClaimedRun | None:
        now = utcnow()
        stale_before = now - timedelta(seconds=settings.heartbeat_timeout_s)
        if not runs.claim(session, run_id, token, worker_name, now, stale_before):
            return None
        return runs.begin(session, run_id)

    # a store that is briefly down must not make this delivery drop the run (the sweep would resend it,
    # but only after H2T_RESEND_AFTER_S)
    claimed = in_store(settings, claim, f"claiming run {run_id}")
    if claimed is None:
        log.info("run %s is not claimable (taken, finished or cancelled): skipped", run_id, extra={"run_id": run_id})
        return Outcome.skipped
    log.info("claimed run %s (attempt by %s)", run_id, worker_name, extra={"run_id": run_id})

    beat = Heartbeat(settings, run_id, token)
    beat.start()
    try:
        outcome = _train(run_id, settings, token, claimed, beat, stop, requeue)
    finally:
        beat.stopped.set()
    log.info("run %s %s", run_id, outcome, extra={"run_id": run_id})
    return outcome


def _train(run_id: str, settings: Settings, token: str, run: ClaimedRun, beat: Heartbeat, stop: threading.Event,
           requeue: Callable[[str], None]) -> Outcome:
    from models.core.data import load_dataset
    from models.core.export import export_and_calibrate
    from models.core.pretrained import WeightSource
    from models.core.source import loader_workers
    from models.core.train import TrainingCancelled, TrainingInterrupted, resolve_device, train_two_stage

    def on_epoch(m: EpochMetrics) -> None:
        if beat.lost.is_set():
            raise ClaimLost
        status = in_store(settings, lambda session: runs.record_epoch(session, run_id, token, m),
                          f"recording epoch {m.epoch} of stage {m.stage} of run {run_id}")
        if status is None:
            raise ClaimLost
        if status == RunStatus.cancelling:
            raise TrainingCancelled

    artifacts = settings.artifacts
    folder = artifacts.run(run_id)
    exported, files = None, []
    try:
        config = run.config
        dataset = load_dataset(run.dataset, settings.data_root, artifacts, augment=config.augment, loader=config.loader)
        result = train_two_stage(dataset, run.config, folder, resolve_device(), on_epoch,
                                 artifacts.run(run.stage1_from) if run.stage1_from else None, stop.is_set,
                                 WeightSource(settings.data_root, settings.allow_weight_download))
        if result.pretrained is not None:
            log.info(result.pretrained.summary(), extra={"run_id": run_id})
        try:
            served = export_and_calibrate(result.model, dataset, result.groups, folder.onnx,
                                          loader_workers(config.loader))
        except Exception as exc:
            raise ExportFailed(f"ONNX export failed: {type(exc).__name__}: {exc}") from exc
        exported = ExportedModel(_stored(artifacts, ONNX_KIND, served.export.path), served.spec,
                                 served.export.parity_max_abs_diff, served.export.parity_images, served.calibration)
        files = _checkpoint_files(artifacts, folder)
        status, error = RunStatus.succeeded, None
    except ClaimLost:
        return Outcome.lost
    except TrainingInterrupted as exc:
        send_again = in_store(settings, lambda session: runs.release(session, run_id, token),
                              f"releasing run {run_id}")
        if send_again:
            requeue(run_id)  # after the commit, so the next worker finds it queued
        log.warning("run %s requeued: %s", run_id, exc, extra={"run_id": run_id})
        return Outcome.requeued
    except TrainingCancelled:
        status, error = RunStatus.cancelled, None
    except Exception as exc:  # the run failed, the worker carries on with the next one
        log.error("run %s failed:\n%s", run_id, traceback.format_exc(), extra={"run_id": run_id})
        status, error = RunStatus.failed, str(exc) if isinstance(exc, ExportFailed) else f"{type(exc).__name__}: {exc}"
    def end(session: Session) -> RunStatus | None:
        if exported is not None:
            return runs.succeed(session, run_id, token, exported, files)
        return runs.finish(session, run_id, token, status, error)

    ended = in_store(settings, end, f"ending run {run_id}")
    return Outcome.lost if ended is None else Outcome(ended.value)
