"""Run use cases of the API. Take the session, never commit: the request is the unit of work.
Status changes belong to the run state machine in service.store.runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models.contract.config import ReferenceDataset, RunConfig
from models.contract.metrics import StepProgress
from models.contract.pretrained import PretrainedFile, resolve_in_root
from service.api.datasets.service import get as get_dataset
from service.api.runs.schemas import MetricPublic, RunCreate, RunPublic, RunUpdate
from service.store import workers
from service.store.errors import InvalidInput, ResourceConflict, ResourceNotFound
from service.store.orm import DatasetStatus, MetricRow, ModelRow, RunRow, RunStatus, RunTagRow, utcnow
from service.store.runs import get
from service.store.settings import Settings

TRAINING = (RunStatus.running, RunStatus.cancelling)  # statuses whose progress is current


def metric_public(row: MetricRow) -> MetricPublic:
    return MetricPublic(**row.values, created_at=row.created_at)


def to_public(row: RunRow, latest: MetricRow | None, has_model: bool) -> RunPublic:
    return RunPublic(
        id=row.id, name=row.name, tags=sorted(t.tag for t in row.tags), dataset_id=row.dataset_id,
        stage1_from=row.stage1_from, config=RunConfig.model_validate(row.config),
        status=row.status, stage=row.stage, epoch=row.epoch, total_epochs=row.total_epochs,
        latest_metrics=metric_public(latest) if latest else None, model_id=row.id if has_model else None,
        progress=StepProgress.model_validate(row.progress) if row.progress and row.status in TRAINING else None,
        error=row.error, attempts=row.attempts, worker=row.worker, created_at=row.created_at,
        started_at=row.started_at, finished_at=row.finished_at, heartbeat_at=row.heartbeat_at,
    )


def to_public_many(session: Session, rows: list[RunRow]) -> list[RunPublic]:
    """Public views of runs with two queries in all (latest metric rows, model ids), not two per run."""
    ids = [row.id for row in rows]
    if not ids:
        return []
    newest = (select(MetricRow.id, func.row_number().over(
        partition_by=MetricRow.run_id, order_by=(MetricRow.stage.desc(), MetricRow.epoch.desc())).label("rank"))
        .where(MetricRow.run_id.in_(ids)).subquery())
    latest = {m.run_id: m for m in session.scalars(
        select(MetricRow).join(newest, MetricRow.id == newest.c.id).where(newest.c.rank == 1))}
    models = set(session.scalars(select(ModelRow.run_id).where(ModelRow.run_id.in_(ids))))
    return [to_public(row, latest.get(row.id), row.id in models) for row in rows]


def public(session: Session, row: RunRow) -> RunPublic:
    return to_public_many(session, [row])[0]


def check_pretrained_file(config: RunConfig, data_root: Path) -> None:
    """A weights file must be a file inside the data root (no link out of it); workers check again."""
    if not isinstance(config.pretrained, PretrainedFile):
        return
    try:
        path = resolve_in_root(data_root, config.pretrained.file)
        found = path.is_file()
    except (ValueError, OSError) as exc:  # OSError: a name this file system cannot hold, a loop of links
        raise InvalidInput(f"pretrained.file: {exc}") from exc
    if not found:
        raise InvalidInput(f"pretrained.file: no file {config.pretrained.file!r} under the data root")


def stage1_finished(run: RunRow) -> bool:
    """Whether `run` holds (or reused) a finished stage 1 another run can start from: it succeeded, or it
    reused one, or its stage 2 has recorded an epoch (stage 2 starts from stage 1's final checkpoint)."""
    return run.status == RunStatus.succeeded or run.stage1_from is not None or (run.stage == 2 and run.epoch >= 1)


def _held_out(config: RunConfig, dataset) -> tuple | None:
    """What a run's validation split takes out of the training images, where it may take any."""
    validation = config.validation
    if validation is None or not validation.may_carve(dataset.dataset_spec()):
        return None
    return validation.source, validation.fraction


def create(session: Session, body: RunCreate, settings: Settings) -> RunRow:
    dataset = get_dataset(session, body.dataset_id)
    if dataset.status != DatasetStatus.ready:
        raise ResourceConflict(f"dataset {dataset.id} is {dataset.status}, not ready"
                               + (f": {dataset.error}" if dataset.error else ""))
    config = RunConfig.model_validate(body.model_dump(exclude={"dataset_id", "stage1_from", "name", "tags"}))
    check_pretrained_file(config, settings.data_root)
    workers.check_devices(session, config.devices, utcnow(), settings.worker_seen_within_s)
    try:
        config.loader.streams(0, 1, isinstance(dataset.dataset_spec(), ReferenceDataset))
    except ValueError as exc:
        raise InvalidInput(f"loader.mode: {exc}") from exc
    if config.validation is not None:
        try:
            config.validation.check_for(dataset.dataset_spec())
        except ValueError as exc:
            raise InvalidInput(f"validation.source: {exc}") from exc
    definition = dataset.group_config()
    if config.groups is not None and config.groups != definition:
        raise InvalidInput(f"groups: runs on dataset {dataset.id} use its group definition "
                           f"{definition.model_dump_json()}; leave groups out of the run")
    config = config.model_copy(update={"groups": definition})
    if body.stage1_from is not None:
        source = session.get(RunRow, body.stage1_from)
        if source is None:
            raise ResourceNotFound(f"stage1_from: run {body.stage1_from} not found")
        if not stage1_finished(source):
            raise ResourceConflict(f"stage1_from: run {source.id} has not finished its stage 1 ({source.status}, "
                                   f"stage {source.stage or 1} epoch {source.epoch})")
        source_config = RunConfig.model_validate(source.config)
        if source.dataset_id != body.dataset_id or source_config.backbone != config.backbone:
            raise ResourceConflict("stage1_from: that run trained another dataset or backbone")
        if _held_out(source_config, dataset) != _held_out(config, dataset):
            raise ResourceConflict("stage1_from: that run's stage 1 trained on another split of the training images "
                                   "(validation carved differently); hold out the same validation split")
    # the run whose stage 1 was trained: a run that itself reused one holds no stage-1 checkpoint
    stage1_from = None if body.stage1_from is None else (source.stage1_from or source.id)
    row = RunRow(dataset_id=dataset.id, stage1_from=stage1_from, config=config.model_dump(mode="json"),
                 status=RunStatus.queued, enqueued_at=utcnow(), name=body.name, method=config.stage2.method,
                 tags=[RunTagRow(tag=tag) for tag in dict.fromkeys(body.tags)])
    session.add(row)
    session.flush()
    return row


@dataclass(frozen=True)
class RunFilter:
    """What GET /v1/runs narrows the list to; every field given must hold (tags: each of them)."""

    status: RunStatus | None = None
    dataset_id: str | None = None
    method: str | None = None
    stage1_from: str | None = None
    name: str | None = None
    tags: tuple[str, ...] = ()
    search: str | None = None  # within the name, any case


SORT_KEYS = {"created_at": RunRow.created_at, "started_at": RunRow.started_at,
             "finished_at": RunRow.finished_at, "name": RunRow.name, "status": RunRow.status}


def list_runs(session: Session, limit: int, offset: int, where: RunFilter = RunFilter(),
              sort: str = "-created_at") -> tuple[list[RunRow], int]:
    """A page of runs, and how many match in all. `sort`: a key of SORT_KEYS, `-` first for descending."""
    query = select(RunRow)
    for column, value in ((RunRow.status, where.status), (RunRow.dataset_id, where.dataset_id),
                          (RunRow.method, where.method), (RunRow.stage1_from, where.stage1_from),
                          (RunRow.name, where.name)):
        if value is not None:
            query = query.where(column == value)
    for tag in dict.fromkeys(where.tags):
        query = query.where(RunRow.id.in_(select(RunTagRow.run_id).where(RunTagRow.tag == tag)))
    if where.search:  # autoescape: a % or _ typed is that character, not a wildcard
        query = query.where(func.lower(RunRow.name).contains(where.search.lower(), autoescape=True))
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    column = SORT_KEYS[sort.removeprefix("-")]
    order = column.desc().nulls_last() if sort.startswith("-") else column.asc().nulls_last()
    rows = session.scalars(query.order_by(order, RunRow.created_at.desc(), RunRow.id).limit(limit).offset(offset))
    return list(rows), total


def update(session: Session, run_id: str, body: RunUpdate) -> RunRow:
    row = get(session, run_id)
    if "name" in body.model_fields_set:
        row.name = body.name
    if body.tags is not None:
        row.tags = [RunTagRow(tag=tag) for tag in dict.fromkeys(body.tags)]
    session.flush()
    return row


def metrics(session: Session, run_id: str) -> list[MetricRow]:
    get(session, run_id)
    return list(session.scalars(select(MetricRow).where(MetricRow.run_id == run_id)
                                .order_by(MetricRow.stage, MetricRow.epoch)))
