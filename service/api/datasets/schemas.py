from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from models.contract.config import BuiltinDataset, ImageSize
from service.store.orm import NAME_LENGTH


class DatasetOptions(BaseModel):
    name: str | None = Field(None, max_length=NAME_LENGTH, description="defaults to one made from the dataset")


class BuiltinDatasetCreate(BuiltinDataset, DatasetOptions):
    """JSON body of POST /v1/datasets for a builtin dataset made long-tailed."""


class ArchiveDatasetForm(DatasetOptions):
    """The fields beside the `archive` file of a multipart POST /v1/datasets."""

    image_size: ImageSize = 32


class DatasetPublic(BaseModel):
    id: str
    name: str
    kind: str = Field(description="builtin or archive: the key its spec names")
    spec: dict
    num_classes: int
    class_names: list[str]
    train_counts: list[int]
    test_counts: list[int]
    groups: list[str] = Field(description="many/medium/few per class by training count (default thresholds)")
    image_size: int
    created_at: datetime


class DatasetsPublic(BaseModel):
    data: list[DatasetPublic]
    count: int
