"""The SQL store, shared by the API and the workers. Change it only through an Alembic migration."""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime

from sqlalchemy import JSON, DateTime, Enum, Float, ForeignKey, Integer, MetaData, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from models.contract.config import DATASET_SPEC, DatasetSpec, GroupConfig

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


NAME_LENGTH = 200  # a dataset's or a run's name, as stored
TAG_LENGTH = 64


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return str(uuid.uuid4())


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class RunStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelling = "cancelling"
    cancelled = "cancelled"


TERMINAL = (RunStatus.succeeded, RunStatus.failed, RunStatus.cancelled)


class DatasetStatus(enum.StrEnum):
    """A dataset by reference is `scanning` until a worker has read its index; the others are `ready` at once."""

    scanning = "scanning"
    ready = "ready"
    failed = "failed"


class DatasetRow(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    spec: Mapped[dict] = mapped_column(JSON)  # a models.contract.config DatasetConfig (tagged by its key)
    class_names: Mapped[list] = mapped_column(JSON)
    train_counts: Mapped[list] = mapped_column(JSON)
    test_counts: Mapped[list] = mapped_column(JSON)
    image_size: Mapped[int] = mapped_column(Integer)
    # a models.contract.config GroupConfig: the many/medium/few classes every run and report on it uses
    group_definition: Mapped[dict] = mapped_column(JSON, default=lambda: GroupConfig().model_dump(mode="json"))
    status: Mapped[DatasetStatus] = mapped_column(
        Enum(DatasetStatus, name="dataset_status", native_enum=False, length=16), default=DatasetStatus.ready)
    error: Mapped[str | None] = mapped_column(Text)  # why the scan failed
    unreadable: Mapped[list | None] = mapped_column(JSON)  # [{path, reason}]: the first files the scan left out
    unreadable_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # all it left out
    # last sent to the broker for scanning; a dataset still scanning long after is sent again
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    def dataset_spec(self) -> DatasetSpec:
        return DATASET_SPEC.validate_python(self.spec)

    def group_config(self) -> GroupConfig:
        return GroupConfig.model_validate(self.group_definition)


class RunRow(Base):
    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id", ondelete="RESTRICT"), index=True)
    stage1_from: Mapped[str | None] = mapped_column(ForeignKey("runs.id", ondelete="RESTRICT"))
    config: Mapped[dict] = mapped_column(JSON)  # a models.contract.config RunConfig, as JSON
    status: Mapped[RunStatus] = mapped_column(Enum(RunStatus, name="run_status", native_enum=False, length=16),
                                              default=RunStatus.queued, index=True)
    stage: Mapped[int | None] = mapped_column(Integer)
    epoch: Mapped[int] = mapped_column(Integer, default=0)  # epochs finished in the current stage
    total_epochs: Mapped[int | None] = mapped_column(Integer)  # of the current stage
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # times a worker claimed it
    claim_token: Mapped[str | None] = mapped_column(String(36))  # the current claim; stale workers lose it
    worker: Mapped[str | None] = mapped_column(String(200))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # last sent to the broker; a run queued long after it is sent again (its message may be lost)
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # a models.contract.metrics StepProgress as JSON: where the epoch under way stands, written every few seconds
    progress: Mapped[dict | None] = mapped_column(JSON)
    name: Mapped[str | None] = mapped_column(String(NAME_LENGTH), index=True)  # the user's, not unique
    method: Mapped[str] = mapped_column(String(16), index=True, default="h2t",
                                        server_default="h2t")  # config.stage2.method, to filter on
    tags: Mapped[list[RunTagRow]] = relationship(cascade="all, delete-orphan", order_by=lambda: RunTagRow.tag,
                                                 lazy="selectin")

    metrics: Mapped[list[MetricRow]] = relationship(
        back_populates="run", order_by=lambda: (MetricRow.stage, MetricRow.epoch), cascade="all, delete-orphan")


class RunTagRow(Base):
    """One tag of a run (a row per tag, so lists filter by tag with an index on every database)."""

    __tablename__ = "run_tags"

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    tag: Mapped[str] = mapped_column(String(TAG_LENGTH), primary_key=True, index=True)


class MetricRow(Base):
    """One row per run, stage and epoch: an epoch replayed after a crash overwrites its row.

    `values` is the trainer's EpochMetrics record as one JSON document, so a field added to the
    record reaches the store and the API without a column of its own."""

    __tablename__ = "metrics"
    __table_args__ = (UniqueConstraint("run_id", "stage", "epoch", name="uq_metrics_run_stage_epoch"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    stage: Mapped[int] = mapped_column(Integer)
    epoch: Mapped[int] = mapped_column(Integer)
    values: Mapped[dict] = mapped_column(JSON)  # models.contract.metrics.EpochMetrics, dumped
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    run: Mapped[RunRow] = relationship(back_populates="metrics")


class ArtifactRow(Base):
    """A file a run produced (checkpoints, the ONNX model); its path is relative to the artifact store."""

    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("run_id", "kind", name="uq_artifacts_run_kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    path: Mapped[str] = mapped_column(String(500))
    size_bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ModelRow(Base):
    """An exported classifier: a succeeded run's (its id is the run's id) or one imported from a folder that
    `h2t train` wrote (`origin` says where it came from; no run)."""

    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    run_id: Mapped[str | None] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), unique=True)
    origin: Mapped[dict | None] = mapped_column(JSON)  # an imported model's provenance: folder, config, figures
    onnx_path: Mapped[str] = mapped_column(String(500))  # relative to the artifact store
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    parity_max_abs_diff: Mapped[float] = mapped_column(Float)
    parity_images: Mapped[int] = mapped_column(Integer)
    input_spec: Mapped[dict] = mapped_column(JSON)
    class_names: Mapped[list] = mapped_column(JSON)
    groups: Mapped[list] = mapped_column(JSON)
    calibration: Mapped[dict] = mapped_column(JSON)  # overall/many/medium/few: n, accuracy, ece, bins
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


REGISTRY_NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$"  # a registered model's name or an alias: never an id
REGISTRY_NAME_LENGTH = 64


class RegisteredModelRow(Base):
    """A name for a line of models: numbered versions (each one model) and aliases such as `production`."""

    __tablename__ = "registered_models"

    name: Mapped[str] = mapped_column(String(REGISTRY_NAME_LENGTH), primary_key=True)
    description: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    created_by: Mapped[str] = mapped_column(String(NAME_LENGTH))
    versions: Mapped[list[ModelVersionRow]] = relationship(
        cascade="all, delete-orphan", order_by=lambda: ModelVersionRow.version, lazy="selectin")
    aliases: Mapped[list[ModelAliasRow]] = relationship(
        cascade="all, delete-orphan", order_by=lambda: ModelAliasRow.alias, lazy="selectin")


class ModelVersionRow(Base):
    """Version N of a registered model: one model (a run's export). A model in use here cannot be deleted."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_model_versions_name_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(ForeignKey("registered_models.name", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="RESTRICT"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    created_by: Mapped[str] = mapped_column(String(NAME_LENGTH))


class ModelAliasRow(Base):
    """An alias of a registered model and the version it points at now; `alias_events` holds its moves."""

    __tablename__ = "model_aliases"

    name: Mapped[str] = mapped_column(ForeignKey("registered_models.name", ondelete="CASCADE"), primary_key=True)
    alias: Mapped[str] = mapped_column(String(REGISTRY_NAME_LENGTH), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_by: Mapped[str] = mapped_column(String(NAME_LENGTH))


class AliasEventRow(Base):
    """One move of an alias: to a version, or removed (version null); who did it and when."""

    __tablename__ = "alias_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(ForeignKey("registered_models.name", ondelete="CASCADE"), index=True)
    alias: Mapped[str] = mapped_column(String(REGISTRY_NAME_LENGTH))
    version: Mapped[int | None] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    by: Mapped[str] = mapped_column(String(NAME_LENGTH))


class WorkerRow(Base):
    """A training worker process as it last announced itself: how many devices it owns, so a run asking for
    more than any worker owns is refused at submission."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)  # host:pid
    devices: Mapped[int] = mapped_column(Integer)
    device_type: Mapped[str] = mapped_column(String(16))  # cuda | cpu
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
