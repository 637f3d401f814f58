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
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import sqlalchemy.exc
from sqlalchemy.orm import Session

if TYPE_CHECKING:
    import torch

    from models.core.export import ServedModel
    from models.core.launch import TrainingHooks
    from models.core.ranks import Ranks

from models.contract.layout import ONNX_KIND, STAGES, ArtifactLayout, RunFolder, checkpoint_kind
from models.contract.metrics import EpochMetrics, StepProgress
from models.contract.onnx_model import sha256_file
from service.store import runs
from service.store.db import session_scope
from service.store.logs import RunLogHandler
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
              requeue: Callable[[str, int], None] = lambda run_id, devices: None) -> Outcome:
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
    run_log = RunLogHandler(settings.artifacts.run(run_id).log, run_id)
    logging.getLogger().addHandler(run_log)
    try:
        log.info("claimed run %s (attempt by %s)", run_id, worker_name, extra={"run_id": run_id})
        beat = Heartbeat(settings, run_id, token)
        beat.start()
        try:
            outcome = _train(run_id, settings, token, claimed, beat, stop, requeue)
        finally:
            beat.stopped.set()
        log.info("run %s %s", run_id, outcome, extra={"run_id": run_id})
    finally:
        logging.getLogger().removeHandler(run_log)
        run_log.close()
    return outcome


@dataclass(frozen=True)
class TrainedRun:
    """What rank 0 hands back after training and exporting a run."""

    served: ServedModel
    pretrained: str | None  # what loading pretrained weights did, for the log


def train_and_export(ranks: Ranks, device: torch.device, hooks: TrainingHooks, run: ClaimedRun, run_id: str,
                     settings: Settings) -> TrainedRun | None:
    """One rank's part of a run (on one device: the whole run): load the dataset, train both stages, and on
    rank 0 export and calibrate the model. Runs in the worker's process, or in each rank's process."""
    from models.core.data import load_dataset
    from models.core.export import export_and_calibrate
    from models.core.pretrained import WeightSource
    from models.core.source import loader_workers
    from models.core.train import train_two_stage

    artifacts, config = settings.artifacts, run.config
    folder = artifacts.run(run_id)
    dataset = load_dataset(run.dataset, settings.data_root, artifacts, augment=config.augment, loader=config.loader,
                           validation=config.validation)
    result = train_two_stage(dataset, config, folder, device, hooks.on_epoch,
                             artifacts.run(run.stage1_from) if run.stage1_from else None, hooks.stop_requested,
                             WeightSource(settings.data_root, settings.allow_weight_download), ranks, hooks.on_progress)
    if not ranks.main:
        return None
    try:
        served = export_and_calibrate(result.model, dataset, result.groups, folder.onnx, loader_workers(config.loader),
                                      config.validation)
    except Exception as exc:
        raise ExportFailed(f"ONNX export failed: {type(exc).__name__}: {exc}") from exc
    return TrainedRun(served, result.pretrained.summary() if result.pretrained is not None else None)


def owned_devices(settings: Settings) -> tuple[int, str]:
    """(devices this worker process owns, their type): H2T_WORKER_DEVICES, else the GPUs it sees, else 1 CPU."""
    import torch

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if settings.worker_devices is not None:
        return settings.worker_devices, device_type
    return (torch.cuda.device_count() if device_type == "cuda" else 1), device_type


def _train(run_id: str, settings: Settings, token: str, run: ClaimedRun, beat: Heartbeat, stop: threading.Event,
           requeue: Callable[[str, int], None]) -> Outcome:
    from models.contract.reporting import epoch_line
    from models.core.launch import RankFailed, RankLost, TrainingHooks, launch
    from models.core.ranks import SINGLE
    from models.core.train import TrainingCancelled, TrainingInterrupted, resolve_device

    def act_on(status: RunStatus | None) -> None:
        """What the store's answer to a report asks: stop without writing (claim lost), or stop as cancelled."""
        if status is None:
            raise ClaimLost
        if status == RunStatus.cancelling:
            raise TrainingCancelled

    def on_epoch(m: EpochMetrics) -> None:
        if beat.lost.is_set():
            raise ClaimLost
        status = in_store(settings, lambda session: runs.record_epoch(session, run_id, token, m),
                          f"recording epoch {m.epoch} of stage {m.stage} of run {run_id}")
        log.info("run %s %s", run_id, epoch_line(m), extra={"run_id": run_id})
        act_on(status)

    def on_progress(p: StepProgress) -> None:  # every few seconds inside an epoch: a cancel stops between steps
        if beat.lost.is_set():
            raise ClaimLost
        try:  # one try, no retries: progress is best effort, the epoch's record is what must land
            with session_scope(settings.database_url) as session:
                status = runs.record_progress(session, run_id, token, p)
        except sqlalchemy.exc.SQLAlchemyError:
            log.warning("could not record the progress of run %s", run_id, extra={"run_id": run_id})
            return
        act_on(status)

    def send_back(release: Callable[[Session], bool], why: str) -> Outcome:
        if in_store(settings, release, f"releasing run {run_id}"):
            requeue(run_id, devices)  # after the commit, so the next worker finds it queued
            log.warning("run %s requeued: %s", run_id, why, extra={"run_id": run_id})
            return Outcome.requeued
        ended = in_store(settings, lambda session: runs.get(session, run_id).status, f"reading run {run_id}")
        log.warning("run %s not requeued (%s): %s", run_id, ended, why, extra={"run_id": run_id})
        return Outcome(ended.value) if ended in (RunStatus.failed, RunStatus.cancelled) else Outcome.lost

    artifacts = settings.artifacts
    folder = artifacts.run(run_id)
    devices = run.config.devices
    exported, files = None, []
    try:
        owned, device_type = owned_devices(settings)
        if devices > owned:
            raise ValueError(f"this run asks for {devices} devices; this worker owns {owned} (H2T_WORKER_DEVICES)")
        hooks = TrainingHooks(on_epoch, on_progress, stop.is_set)
        if devices == 1:
            trained = train_and_export(SINGLE, resolve_device(), hooks, run, run_id, settings)
        else:
            log.info("training run %s on %d %s processes", run_id, devices, device_type, extra={"run_id": run_id})
            trained = launch(devices, device_type, train_and_export, (run, run_id, settings), hooks)
        if trained.pretrained is not None:
            log.info(trained.pretrained, extra={"run_id": run_id})
        served = trained.served
        exported = ExportedModel(_stored(artifacts, ONNX_KIND, served.export.path), served.spec,
                                 served.export.parity_max_abs_diff, served.export.parity_images, served.calibration)
        files = _checkpoint_files(artifacts, folder)
        status, error = RunStatus.succeeded, None
    except ClaimLost:
        return Outcome.lost
    except TrainingInterrupted as exc:
        return send_back(lambda session: runs.release(session, run_id, token), str(exc))
    except RankLost as exc:  # like a lost worker: resume from the last checkpoint, up to max_attempts claims
        lost = str(exc)
        log.error("run %s: %s", run_id, lost, extra={"run_id": run_id})
        return send_back(lambda session: runs.release_lost(session, run_id, token, settings.max_attempts, lost), lost)
    except TrainingCancelled:
        status, error = RunStatus.cancelled, None
    except RankFailed as exc:
        log.error("run %s failed in %s", run_id, exc.details, extra={"run_id": run_id})
        status, error = RunStatus.failed, exc.text if exc.type_name == ExportFailed.__name__ else str(exc)
    except Exception as exc:  # the run failed, the worker carries on with the next one
        log.error("run %s failed:\n%s", run_id, traceback.format_exc(), extra={"run_id": run_id})
        status, error = RunStatus.failed, str(exc) if isinstance(exc, ExportFailed) else f"{type(exc).__name__}: {exc}"

    def end(session: Session) -> RunStatus | None:
        if exported is not None:
            return runs.succeed(session, run_id, token, exported, files)
        return runs.finish(session, run_id, token, status, error)

    ended = in_store(settings, end, f"ending run {run_id}")
    return Outcome.lost if ended is None else Outcome(ended.value)
