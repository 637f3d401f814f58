"""Run use cases for the API and the worker. Take the session, never commit.

Ownership: a worker claims a run with a compare-and-set that writes a fresh claim token; every
later write of that worker names the token, so a worker that lost its claim (declared dead and
requeued) cannot write over the run that another worker now trains.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from models.contract.config import RunConfig
from models.contract.metrics import EpochMetrics
from service.api.datasets.service import get as get_dataset
from service.api.errors import InvalidInput, ResourceConflict, ResourceNotFound
from service.api.runs.schemas import MetricPublic, RunCreate, RunPublic
from service.store.orm import TERMINAL, MetricRow, ModelRow, RunRow, RunStatus, utcnow

METRIC_FIELDS = EpochMetrics.measured_fields()  # the trainer's report is the row


def metric_public(row: MetricRow) -> MetricPublic:
    return MetricPublic.model_validate(row, from_attributes=True)


def to_public(session: Session, row: RunRow) -> RunPublic:
    latest = session.scalars(select(MetricRow).where(MetricRow.run_id == row.id)
                             .order_by(MetricRow.stage.desc(), MetricRow.epoch.desc()).limit(1)).first()
    return RunPublic(
        id=row.id, dataset_id=row.dataset_id, stage1_from=row.stage1_from, config=RunConfig.model_validate(row.config),
        status=row.status, stage=row.stage, epoch=row.epoch, total_epochs=row.total_epochs,
        latest_metrics=metric_public(latest) if latest else None,
        model_id=row.id if session.get(ModelRow, row.id) is not None else None, error=row.error, attempts=row.attempts,
        worker=row.worker, created_at=row.created_at, started_at=row.started_at, finished_at=row.finished_at,
        heartbeat_at=row.heartbeat_at,
    )


def get(session: Session, run_id: str) -> RunRow:
    row = session.get(RunRow, run_id)
    if row is None:
        raise ResourceNotFound(f"run {run_id} not found")
    return row


def create(session: Session, body: RunCreate) -> RunRow:
    dataset = get_dataset(session, body.dataset_id)
    config = RunConfig.model_validate(body.model_dump(exclude={"dataset_id", "stage1_from"}))
    num_classes = len(dataset.class_names)
    if config.groups.slices is not None and config.groups.slices[2][1] != num_classes:
        raise InvalidInput(f"groups.slices must end at the dataset's {num_classes} classes")
    if body.stage1_from is not None:
        source = session.get(RunRow, body.stage1_from)
        if source is None:
            raise ResourceNotFound(f"stage1_from: run {body.stage1_from} not found")
        if source.status != RunStatus.succeeded:
            raise ResourceConflict(f"stage1_from: run {source.id} is {source.status}, not succeeded")
        source_config = RunConfig.model_validate(source.config)
        if source.dataset_id != body.dataset_id or source_config.backbone != config.backbone:
            raise ResourceConflict("stage1_from: that run trained another dataset or backbone")
    row = RunRow(dataset_id=dataset.id, stage1_from=body.stage1_from, config=config.model_dump(mode="json"),
                 status=RunStatus.queued)
    session.add(row)
    session.flush()
    return row


def list_runs(session: Session, limit: int, offset: int, status: RunStatus | None) -> tuple[list[RunRow], int]:
    query = select(RunRow)
    if status is not None:
        query = query.where(RunRow.status == status)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(RunRow.created_at.desc(), RunRow.id).limit(limit).offset(offset))
    return list(rows), total


def metrics(session: Session, run_id: str) -> list[MetricRow]:
    get(session, run_id)
    return list(session.scalars(select(MetricRow).where(MetricRow.run_id == run_id)
                                .order_by(MetricRow.stage, MetricRow.epoch)))


def cancel(session: Session, run_id: str) -> RunRow:
    """A queued run is cancelled at once; a running one is asked to stop at its next epoch end."""
    row = get(session, run_id)
    if row.status in TERMINAL:
        raise ResourceConflict(f"run {run_id} is already {row.status}")
    if row.status == RunStatus.queued:
        row.status, row.finished_at = RunStatus.cancelled, utcnow()
    elif row.status == RunStatus.running:
        row.status = RunStatus.cancelling
    session.flush()
    return row


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


def set_stage(session: Session, run_id: str, token: str, stage: int, epoch: int, total_epochs: int) -> None:
    session.execute(update(RunRow).where(RunRow.id == run_id, RunRow.claim_token == token)
                    .values(stage=stage, epoch=epoch, total_epochs=total_epochs, heartbeat_at=utcnow()))


def record_epoch(session: Session, run_id: str, token: str, values: dict) -> RunStatus | None:
    """Write (or overwrite) the metric row of (run, stage, epoch) and the run's progress.

    Returns the run's status (cancelling asks the worker to stop), or None when the claim is lost.
    """
    row = session.scalars(select(RunRow).where(RunRow.id == run_id).with_for_update()).first()
    if row is None or row.claim_token != token:
        return None
    metric = session.scalars(select(MetricRow).where(
        MetricRow.run_id == run_id, MetricRow.stage == values["stage"], MetricRow.epoch == values["epoch"])).first()
    if metric is None:
        metric = MetricRow(run_id=run_id, stage=values["stage"], epoch=values["epoch"])
        session.add(metric)
    for field in METRIC_FIELDS:
        setattr(metric, field, float(values[field]))
    metric.created_at = utcnow()
    row.stage, row.epoch, row.total_epochs = values["stage"], values["epoch"], values["epochs"]
    row.heartbeat_at = utcnow()
    session.flush()
    return row.status


def finish(session: Session, run_id: str, token: str, status: RunStatus, error: str | None = None) -> bool:
    result = session.execute(
        update(RunRow).where(RunRow.id == run_id, RunRow.claim_token == token)
        .values(status=status, error=error, finished_at=utcnow(), claim_token=None))
    return result.rowcount == 1


def release(session: Session, run_id: str, token: str) -> bool:
    """Give a claimed run back to the queue (its worker is shutting down after a checkpoint); a run
    being cancelled becomes cancelled. True when it should be sent to the broker again."""
    row = session.get(RunRow, run_id)
    if row is None or row.claim_token != token:
        return False
    row.claim_token = None
    if row.status == RunStatus.cancelling:
        row.status, row.finished_at = RunStatus.cancelled, utcnow()
        return False
    row.status = RunStatus.queued
    session.flush()
    return True


def sweep_stale(session: Session, now: datetime, timeout_s: float, max_attempts: int) -> list[str]:
    """Runs whose worker stopped sending heartbeats: requeue them (returns their ids, to be sent to the
    broker after commit), or fail them after max_attempts claims; a cancelling one becomes cancelled."""
    stale_before = now - timedelta(seconds=timeout_s)
    stale = session.scalars(select(RunRow).where(
        RunRow.status.in_([RunStatus.running, RunStatus.cancelling]), RunRow.heartbeat_at < stale_before,
    ).with_for_update(skip_locked=True)).all()
    requeued = []
    for row in stale:
        row.claim_token = None
        if row.status == RunStatus.cancelling:
            row.status, row.finished_at = RunStatus.cancelled, now
        elif row.attempts >= max_attempts:
            row.status, row.finished_at = RunStatus.failed, now
            row.error = f"worker lost {row.attempts} times (last heartbeat {row.heartbeat_at:%Y-%m-%d %H:%M:%S} UTC)"
        else:
            row.status = RunStatus.queued
            requeued.append(row.id)
    session.flush()
    return requeued
