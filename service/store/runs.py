"""The run state machine and the workers' claim protocol. Functions take the session and never commit.

queued -> running -> succeeded | failed; queued -> cancelled; running -> cancelling -> cancelled;
running -> queued when its worker stops after a checkpoint or goes silent (the sweep).

Ownership: a worker claims a run with a compare-and-set that writes a fresh claim token; every
later write of that worker names the token, so a worker that lost its claim (declared dead and
requeued) cannot write over the run that another worker now trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy import delete as delete_rows
from sqlalchemy.orm import Session

from models.contract.config import DatasetSpec, RunConfig
from models.contract.metrics import EpochMetrics, EvaluationReport, StepProgress
from models.contract.onnx_model import ModelSpec
from service.store.errors import ResourceConflict, ResourceNotFound
from service.store.orm import (
    TERMINAL,
    ArtifactRow,
    DatasetRow,
    MetricRow,
    ModelRow,
    ModelVersionRow,
    RunRow,
    RunStatus,
    utcnow,
)


def get(session: Session, run_id: str) -> RunRow:
    row = session.get(RunRow, run_id)
    if row is None:
        raise ResourceNotFound(f"run {run_id} not found")
    return row


def _transition(session: Session, run_id: str, source: RunStatus, token: str | None = None, **values: object) -> bool:
    """Compare-and-set: change the run only while it is in `source` (and, with a token, still claimed
    by that worker). Every status change goes through here, so no change is made on a stale read."""
    query = update(RunRow).where(RunRow.id == run_id, RunRow.status == source)
    if token is not None:
        query = query.where(RunRow.claim_token == token)
    return session.execute(query.values(**values).execution_options(synchronize_session=False)).rowcount == 1


def cancel(session: Session, run_id: str, force: bool = False) -> RunRow:
    """A queued run is cancelled at once; a running one is asked to stop, which its worker does between two
    steps within seconds, keeping its last checkpoint. `force` ends a running or cancelling run as cancelled
    at once, whatever its worker does: the claim is withdrawn, so the worker's next write is refused and it
    stops. Cancelling a run that is already being cancelled changes nothing; a finished run is a conflict."""
    row = get(session, run_id)
    now = utcnow()
    forced = {"status": RunStatus.cancelled, "finished_at": now, "claim_token": None}
    changed = (_transition(session, run_id, RunStatus.queued, status=RunStatus.cancelled, finished_at=now)
               or (force and (_transition(session, run_id, RunStatus.running, **forced)
                              or _transition(session, run_id, RunStatus.cancelling, **forced)))
               or _transition(session, run_id, RunStatus.running, status=RunStatus.cancelling))
    session.refresh(row)
    if not changed and row.status in TERMINAL:
        raise ResourceConflict(f"run {run_id} is already {row.status}")
    return row


def delete(session: Session, run_ids: list[str], force: bool = False) -> list[str]:
    """Delete runs with their metric, artifact, model and tag rows; returns every id deleted, runs that
    reused a stage 1 before the run that trained it. A run still queued or training is a conflict (cancel
    it first), and so is a run whose stage 1 other runs reuse, unless `force`: then those go too."""
    doomed: list[str] = []

    def collect(run_id: str) -> None:
        row = get(session, run_id)
        if row.status not in TERMINAL:
            raise ResourceConflict(f"run {run_id} is {row.status}: cancel it first (POST /v1/runs/{run_id}/cancel, "
                                   "?force=true to end it at once)")
        reusing = list(session.scalars(select(RunRow.id).where(RunRow.stage1_from == run_id).order_by(RunRow.id)))
        if reusing and not force:
            shown = ", ".join(reusing[:5]) + (" and more" if len(reusing) > 5 else "")
            raise ResourceConflict(f"{len(reusing)} run(s) reuse the stage 1 of run {run_id} ({shown}); delete them "
                                   "first, or delete with force=true to delete them too")
        for other in reusing:
            collect(other)
        doomed.append(run_id)

    for run_id in run_ids:
        collect(run_id)
    doomed = list(dict.fromkeys(doomed))
    registered = session.execute(select(ModelVersionRow.name, ModelVersionRow.version, ModelVersionRow.model_id)
                                 .where(ModelVersionRow.model_id.in_(doomed))).first()
    if registered is not None:  # even with force: a registry's version must not vanish under its users
        name, version, model_id = registered
        raise ResourceConflict(f"the model of run {model_id} is version {version} of {name!r}; remove it from the "
                               f"registry first (DELETE /v1/registry/{name}/versions/{version})")
    for run_id in doomed:  # the database cascades to metrics, artifacts, the model and the tags
        session.execute(delete_rows(RunRow).where(RunRow.id == run_id).execution_options(synchronize_session=False))
    session.expire_all()
    return doomed


def requested_devices(session: Session, run_id: str) -> int:
    """The devices a run asks for (which queue it goes to)."""
    return RunConfig.model_validate(get(session, run_id).config).devices


def fail_unsent(session: Session, run_id: str, error: str) -> None:
    """A queued run whose task never reached the broker: it would never start, so it fails."""
    _transition(session, run_id, RunStatus.queued, status=RunStatus.failed, error=error, finished_at=utcnow())


# --- the worker's side -------------------------------------------------------------------------------


def claim(session: Session, run_id: str, token: str, worker: str, now: datetime, stale_before: datetime) -> bool:
    """Take a queued run, or one whose worker went silent; False when another worker holds it."""
    result = session.execute(
        update(RunRow)
        .where(RunRow.id == run_id, or_(
            RunRow.status == RunStatus.queued,
            and_(RunRow.status == RunStatus.running, RunRow.heartbeat_at < stale_before),
        ))
        .values(status=RunStatus.running, claim_token=token, worker=worker, heartbeat_at=now,
                attempts=RunRow.attempts + 1, started_at=func.coalesce(RunRow.started_at, now), error=None)
    )
    return result.rowcount == 1


def heartbeat(session: Session, run_id: str, token: str, now: datetime) -> bool:
    """Refresh the claim; False when this worker no longer owns the run."""
    result = session.execute(update(RunRow).where(RunRow.id == run_id, RunRow.claim_token == token)
                             .values(heartbeat_at=now))
    return result.rowcount == 1


@dataclass(frozen=True)
class ClaimedRun:
    """What a worker needs to train a run it has claimed."""

    config: RunConfig
    dataset: DatasetSpec
    stage1_from: str | None  # a succeeded run whose stage 1 this one reuses


def _stage_epochs(config: RunConfig, stage: int) -> int:
    return config.stage1.epochs if stage == 1 else config.stage2.epochs


def begin(session: Session, run_id: str) -> ClaimedRun:
    """Right after a worker's claim, in its transaction: on the run's first claim its progress points at
    its first stage (2 when it reuses a stage 1); a resumed run keeps the progress its epochs recorded
    (the training resumes from there, and may have nothing left to train but the export). The worker
    gets what it trains."""
    run = session.get(RunRow, run_id)
    config = RunConfig.model_validate(run.config)
    if run.stage is None:
        first = 2 if run.stage1_from else 1
        run.stage, run.epoch, run.total_epochs = first, 0, _stage_epochs(config, first)
    run.heartbeat_at = utcnow()
    session.flush()
    return ClaimedRun(config, session.get(DatasetRow, run.dataset_id).dataset_spec(), run.stage1_from)


def record_epoch(session: Session, run_id: str, token: str, metrics: EpochMetrics) -> RunStatus | None:
    """Write (or overwrite) the metric row of (run, stage, epoch) and the run's progress.

    Returns the run's status (cancelling asks the worker to stop), or None when the claim is lost.
    """
    row = session.scalars(select(RunRow).where(RunRow.id == run_id).with_for_update()).first()
    if row is None or row.claim_token != token:
        return None
    metric = session.scalars(select(MetricRow).where(
        MetricRow.run_id == run_id, MetricRow.stage == metrics.stage, MetricRow.epoch == metrics.epoch)).first()
    if metric is None:
        metric = MetricRow(run_id=run_id, stage=metrics.stage, epoch=metrics.epoch)
        session.add(metric)
    metric.values, metric.created_at = metrics.model_dump(), utcnow()
    row.stage, row.epoch, row.total_epochs = metrics.stage, metrics.epoch, metrics.epochs
    if metrics.stage == 1 and metrics.epoch == metrics.epochs:  # stage 1 is done: progress is stage 2's
        row.stage, row.epoch, row.total_epochs = 2, 0, _stage_epochs(RunConfig.model_validate(row.config), 2)
    row.heartbeat_at = utcnow()
    session.flush()
    return row.status


def record_progress(session: Session, run_id: str, token: str, progress: StepProgress) -> RunStatus | None:
    """Where the epoch under way stands (also a heartbeat). Returns the run's status (cancelling asks the
    worker to stop between steps), or None when the claim is lost."""
    values = {"progress": progress.model_dump(), "heartbeat_at": utcnow()}
    changed = session.execute(update(RunRow).where(RunRow.id == run_id, RunRow.claim_token == token)
                              .values(**values).execution_options(synchronize_session=False)).rowcount
    return session.scalar(select(RunRow.status).where(RunRow.id == run_id)) if changed else None


@dataclass(frozen=True)
class StoredFile:
    """A file a run produced, as the store records it."""

    kind: str  # models.contract.layout: checkpoint_kind(stage) or ONNX_KIND
    path: str  # relative to the artifact store
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class ExportedModel:
    """What the worker measured of a run's exported classifier."""

    onnx: StoredFile
    spec: ModelSpec
    parity_max_abs_diff: float
    parity_images: int
    calibration: EvaluationReport  # of the ONNX model itself on the test split


def finish(session: Session, run_id: str, token: str, status: RunStatus, error: str | None = None) -> RunStatus | None:
    """End a claimed run with `status`, or as cancelled when a cancel arrived meanwhile (a cancelled run
    never becomes succeeded). Returns the status it ended with; None (nothing written) when the claim
    was lost."""
    ended = {"finished_at": utcnow(), "claim_token": None}
    if _transition(session, run_id, RunStatus.running, token, status=status, error=error, **ended):
        return status
    if _transition(session, run_id, RunStatus.cancelling, token, status=RunStatus.cancelled, **ended):
        return RunStatus.cancelled
    return None


def succeed(session: Session, run_id: str, token: str, model: ExportedModel,
            files: list[StoredFile]) -> RunStatus | None:
    """The run's success, its model row and every artifact row, in one unit of work. A run cancelled
    meanwhile ends cancelled with no model; None when the claim was lost."""
    status = finish(session, run_id, token, RunStatus.succeeded)
    if status != RunStatus.succeeded:
        return status
    row = session.get(ModelRow, run_id) or ModelRow(id=run_id, run_id=run_id)  # a run's model has the run's id
    row.onnx_path, row.sha256, row.size_bytes = model.onnx.path, model.onnx.sha256, model.onnx.size_bytes
    row.parity_max_abs_diff, row.parity_images = model.parity_max_abs_diff, model.parity_images
    row.input_spec = model.spec.input_description()
    row.class_names, row.groups = list(model.spec.class_names), list(model.spec.groups)
    row.calibration = model.calibration.model_dump()
    session.add(row)
    for file in [model.onnx, *files]:
        artifact = session.scalars(select(ArtifactRow).filter_by(run_id=run_id, kind=file.kind)).first()
        artifact = artifact or ArtifactRow(run_id=run_id, kind=file.kind)
        artifact.path, artifact.size_bytes, artifact.sha256 = file.path, file.size_bytes, file.sha256
        session.add(artifact)
    session.flush()
    return status


def release(session: Session, run_id: str, token: str) -> bool:
    """Give a claimed run back to the queue (its worker is shutting down after a checkpoint); a run
    being cancelled becomes cancelled. True when it should be sent to the broker again."""
    if _transition(session, run_id, RunStatus.running, token, status=RunStatus.queued, claim_token=None,
                   enqueued_at=utcnow()):
        return True
    _transition(session, run_id, RunStatus.cancelling, token, status=RunStatus.cancelled, finished_at=utcnow(),
                claim_token=None)
    return False


def release_lost(session: Session, run_id: str, token: str, max_attempts: int, error: str) -> bool:
    """A claimed run lost a training process (a rank died): back to the queue to resume from its last
    checkpoint, as when its worker is lost, or failed with `error` after max_attempts claims. True when it
    should be sent to the broker again."""
    row = get(session, run_id)
    if row.status == RunStatus.running and row.attempts >= max_attempts:
        message = f"{error} (attempt {row.attempts} of {max_attempts})"
        _transition(session, run_id, RunStatus.running, token, status=RunStatus.failed, error=message,
                    finished_at=utcnow(), claim_token=None)
        return False
    return release(session, run_id, token)


def sweep_stale(session: Session, now: datetime, timeout_s: float, max_attempts: int,
                resend_after_s: float, store_back_at: datetime | None = None) -> list[str]:
    """The store is the truth of what must run. Runs whose worker stopped sending heartbeats are requeued,
    failed after max_attempts claims, or cancelled when a cancel was pending; runs queued for longer than
    `resend_after_s` since they were last sent are sent again. Returns the ids to send to the broker
    after commit (each marked as sent now).

    `store_back_at`: when the sweeper last found the store reachable again after failing to reach it.
    Heartbeats the store could not take are not a worker's silence, so silence counts from then at the
    earliest: for `timeout_s` after an outage no worker is declared lost."""
    stale_before = now - timedelta(seconds=timeout_s)
    judged = store_back_at is None or store_back_at < stale_before
    stale = session.scalars(select(RunRow).where(
        RunRow.status.in_([RunStatus.running, RunStatus.cancelling]), RunRow.heartbeat_at < stale_before,
    ).with_for_update(skip_locked=True)).all() if judged else []
    requeued = []
    for row in stale:
        row.claim_token = None
        if row.status == RunStatus.cancelling:
            row.status, row.finished_at = RunStatus.cancelled, now
        elif row.attempts >= max_attempts:
            row.status, row.finished_at = RunStatus.failed, now
            row.error = f"worker lost {row.attempts} times (last heartbeat {row.heartbeat_at:%Y-%m-%d %H:%M:%S} UTC)"
        else:
            row.status, row.enqueued_at = RunStatus.queued, now
            requeued.append(row.id)
    waiting = session.scalars(select(RunRow).where(
        RunRow.status == RunStatus.queued,
        func.coalesce(RunRow.enqueued_at, RunRow.created_at) < now - timedelta(seconds=resend_after_s),
    ).with_for_update(skip_locked=True)).all()
    for row in waiting:
        row.enqueued_at = now
        requeued.append(row.id)
    session.flush()
    return requeued
