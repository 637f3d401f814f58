from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from models.contract.config import BuiltinDataset


class BuiltinDatasetCreate(BuiltinDataset):
    """JSON body of POST /v1/datasets for a builtin dataset made long-tailed."""

    name: str | None = Field(None, max_length=200)


class DatasetPublic(BaseModel):
    id: str
    name: str
    kind: str = Field(description="builtin or archive")
    spec: dict
    num_classes: int
    class_names: list[str]
    train_counts: list[int]
    test_counts: list[int]
    groups: list[str] = Field(description="many/medium/few per class by training count (> 100, < 20)")
    image_size: int
    created_at: datetime


class DatasetsPublic(BaseModel):
    data: list[DatasetPublic]
    count: int
