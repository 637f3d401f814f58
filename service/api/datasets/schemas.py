from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, Discriminator, Field, Tag, TypeAdapter, field_validator

from models.contract.config import (
    BuiltinDataset,
    CocoDataset,
    FolderDataset,
    GroupConfig,
    ImageSize,
    ListFilesDataset,
    dataset_tag,
)
from service.store.datasets import UNREADABLE_LISTED
from service.store.orm import NAME_LENGTH, DatasetStatus


class DatasetOptions(BaseModel):
    name: str | None = Field(None, max_length=NAME_LENGTH, description="defaults to one made from the dataset")
    groups: GroupConfig | None = Field(
        None, description="the many/medium/few definition every run and report on the dataset uses; default: the "
        "paper's index slices for builtin cifar100, count thresholds (many > 100, few < 20) otherwise. In a "
        "multipart body, a JSON text")

    @field_validator("groups", mode="before")
    @classmethod
    def _json_text(cls, value: object) -> object:  # a multipart form field carries the definition as JSON text
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError as exc:
                raise ValueError("groups must be a JSON object") from exc
        return value


OPTION_FIELDS = frozenset(DatasetOptions.model_fields)  # what a create body holds beside the dataset's spec


class BuiltinDatasetCreate(BuiltinDataset, DatasetOptions):
    """JSON body of POST /v1/datasets for a builtin dataset made long-tailed."""


class FolderDatasetCreate(FolderDataset, DatasetOptions):
    """JSON body of POST /v1/datasets for an ImageFolder tree under the data root."""


class ListFilesDatasetCreate(ListFilesDataset, DatasetOptions):
    """JSON body of POST /v1/datasets for list files (ImageNet-LT, Places-LT) under the data root."""


class CocoDatasetCreate(CocoDataset, DatasetOptions):
    """JSON body of POST /v1/datasets for COCO-style JSON annotations (iNaturalist 2018) under the data root."""


ReferenceDatasetCreate = FolderDatasetCreate | ListFilesDatasetCreate | CocoDatasetCreate
# the JSON body of POST /v1/datasets: the dataset union's variants a client names (not `archive`: that is
# the multipart body), each with its options
DATASET_CREATE: TypeAdapter[BuiltinDatasetCreate | ReferenceDatasetCreate] = TypeAdapter(Annotated[
    Annotated[BuiltinDatasetCreate, Tag("builtin")] | Annotated[FolderDatasetCreate, Tag("folder")]
    | Annotated[ListFilesDatasetCreate, Tag("list_files")] | Annotated[CocoDatasetCreate, Tag("coco")],
    Discriminator(dataset_tag, custom_error_type="dataset_kind",
                  custom_error_message="a JSON dataset names one of 'builtin', 'folder', 'list_files' or 'coco'"),
])


class ArchiveDatasetForm(DatasetOptions):
    """The fields beside the `archive` file of a multipart POST /v1/datasets."""

    image_size: ImageSize = 32


class UnreadableFilePublic(BaseModel):
    path: str = Field(description="relative to the data root")
    reason: str


class DatasetPublic(BaseModel):
    id: str
    name: str
    kind: str = Field(description="builtin, folder, list_files, coco or archive: the key its spec names")
    spec: dict
    status: DatasetStatus = Field(description="scanning (a dataset by reference being read), ready or failed")
    error: str | None = Field(None, description="why the scan failed")
    unreadable: list[UnreadableFilePublic] = Field(
        default_factory=list, description="files the scan left out (not images, or a header Pillow cannot read); "
        f"the first {UNREADABLE_LISTED} of them")
    unreadable_count: int = Field(0, description="how many files the scan left out in all")
    num_classes: int
    class_names: list[str]
    train_counts: list[int]
    test_counts: list[int]
    group_definition: GroupConfig = Field(description="how its classes split into many/medium/few")
    groups: list[str] = Field(description="many/medium/few per class, by the group definition")
    image_size: int
    created_at: datetime


class DatasetsPublic(BaseModel):
    data: list[DatasetPublic]
    count: int
