from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from models.contract.config import RunConfig
from models.contract.metrics import EpochMetrics, StepProgress
from service.store.orm import NAME_LENGTH, TAG_LENGTH, RunStatus

MAX_TAGS = 20


RunName = Annotated[str, Field(min_length=1, max_length=NAME_LENGTH, description="not unique")]
Tag = Annotated[str, Field(pattern=rf"^[A-Za-z0-9][A-Za-z0-9_.:=+-]{{0,{TAG_LENGTH - 1}}}$",
                           description="letters, digits and _.:=+- ; e.g. sweep-3 or rho=0.5")]
Tags = Annotated[list[Tag], Field(max_length=MAX_TAGS, description=f"at most {MAX_TAGS}; repeats are kept once")]


class RunCreate(RunConfig):
    """POST /v1/runs: the run config (defaults: the paper's CIFAR recipe) plus what it runs on, and its labels."""

    dataset_id: str = Field(min_length=1, max_length=36)
    stage1_from: str | None = Field(None, max_length=36, description="reuse this succeeded run's stage-1 checkpoint")
    name: RunName | None = None
    tags: Tags = []


class RunUpdate(BaseModel):
    """PATCH /v1/runs/{id}: a new name and/or a new set of tags; a field left out stays as it is."""

    model_config = ConfigDict(extra="forbid")

    name: RunName | None = None
    tags: Tags | None = None


class MetricPublic(EpochMetrics):
    """One stage-epoch row: the trainer's record as stored, and when it was written."""

    created_at: datetime


class RunPublic(BaseModel):
    id: str
    name: str | None
    tags: list[str]
    dataset_id: str
    stage1_from: str | None
    config: RunConfig
    status: RunStatus
    stage: int | None = Field(description="1 or 2 while running; the last stage reached afterwards")
    epoch: int = Field(description="epochs finished in the current stage")
    total_epochs: int | None = Field(description="epochs of the current stage")
    latest_metrics: MetricPublic | None
    progress: StepProgress | None = Field(description="while it trains: the epoch under way, every few seconds")
    model_id: str | None = Field(description="the exported model, once the run succeeded: GET /v1/models/{id}")
    error: str | None
    attempts: int
    worker: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None


class RunsPublic(BaseModel):
    data: list[RunPublic]
    count: int


class MetricsPublic(BaseModel):
    data: list[MetricPublic]
    count: int
