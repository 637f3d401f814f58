"""Dataset use cases. Take the session, never commit: the request is the unit of work."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models.contract.catalog import describe_builtin
from models.contract.config import DATASET_SPEC, ArchiveDataset, BuiltinDataset, DatasetSpec, default_groups
from models.contract.metrics import class_groups
from models.contract.reference import DatasetUnavailable, confine, spec_paths
from service.api.datasets.archive import ArchiveLimits, extract_image_folder
from service.api.datasets.schemas import (
    OPTION_FIELDS,
    ArchiveDatasetForm,
    BuiltinDatasetCreate,
    DatasetOptions,
    DatasetPublic,
    ReferenceDatasetCreate,
)
from service.store import runs
from service.store.errors import InvalidInput, ResourceConflict, ResourceNotFound
from service.store.orm import NAME_LENGTH, DatasetRow, DatasetStatus, RunRow, utcnow
from service.store.settings import Settings


def to_public(row: DatasetRow) -> DatasetPublic:
    return DatasetPublic(
        id=row.id, name=row.name, kind=row.dataset_spec().kind, spec=row.spec,
        num_classes=len(row.class_names),
        class_names=row.class_names, train_counts=row.train_counts, test_counts=row.test_counts,
        group_definition=row.group_config(), groups=class_groups(row.train_counts, row.group_config()),
        image_size=row.image_size, created_at=row.created_at,
        status=row.status, error=row.error, unreadable=row.unreadable or [], unreadable_count=row.unreadable_count or 0,
    )


def group_definition(body: DatasetOptions, spec: DatasetSpec, num_classes: int | None) -> dict:
    """The dataset's stored group definition: the one given, else the default for its kind; slices are checked
    against the classes where they are known (a dataset by reference is checked when it is scanned)."""
    definition = body.groups or default_groups(spec)
    if num_classes is not None:
        try:
            definition.check_classes(num_classes)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from exc
    return definition.model_dump(mode="json")


def create_builtin(session: Session, settings: Settings, body: BuiltinDatasetCreate) -> DatasetRow:
    spec = BuiltinDataset.model_validate(body.model_dump(exclude=OPTION_FIELDS))
    try:
        summary = describe_builtin(spec, settings.data_root)
    except FileNotFoundError as exc:
        raise InvalidInput(f"{spec.builtin} is not available on this server: {exc}") from exc
    name = body.name or f"{spec.builtin}-lt-{spec.profile}-if{spec.imbalance_factor:g}"
    row = DatasetRow(name=name, spec=spec.model_dump(mode="json"),
                     class_names=list(summary.class_names), train_counts=list(summary.train_counts),
                     test_counts=list(summary.test_counts), image_size=summary.image_size,
                     group_definition=group_definition(body, spec, len(summary.class_names)))
    session.add(row)
    session.flush()
    return row


def create_reference(session: Session, settings: Settings, body: ReferenceDatasetCreate) -> DatasetRow:
    """A dataset under the data root, `scanning` until a worker has read its index. Its paths are confined
    here (symlinks followed) before anything is written, and again by the scan."""
    spec = DATASET_SPEC.validate_python(body.model_dump(exclude=OPTION_FIELDS))
    try:
        confine(spec, settings.data_root)
    except DatasetUnavailable as exc:
        raise InvalidInput(str(exc)) from exc
    row = DatasetRow(name=body.name or f"{spec.kind}:{spec_paths(spec)[0]}"[:NAME_LENGTH],
                     spec=spec.model_dump(mode="json"), class_names=[], train_counts=[], test_counts=[],
                     image_size=spec.image_size, status=DatasetStatus.scanning, enqueued_at=utcnow(),
                     group_definition=group_definition(body, spec, None))
    session.add(row)
    session.flush()
    return row


def create_from_archive(
    session: Session, settings: Settings, archive_path: Path, form: ArchiveDatasetForm, default_name: str
) -> DatasetRow:
    """Check and extract into a scratch folder, then move it into place; nothing stays on failure."""
    dataset_id = str(uuid.uuid4())
    scratch, final = settings.artifacts.incoming_dataset(dataset_id), settings.artifacts.dataset(dataset_id)
    scratch.parent.mkdir(parents=True, exist_ok=True)
    try:
        limits = ArchiveLimits(settings.max_archive_members, settings.max_archive_bytes, settings.max_image_pixels,
                               settings.max_archive_member_bytes)
        summary = extract_image_folder(archive_path, scratch, limits)
        scratch.rename(final)
        spec = ArchiveDataset(archive=settings.artifacts.relative(final), image_size=form.image_size)
        row = DatasetRow(id=dataset_id, name=form.name or default_name, spec=spec.model_dump(mode="json"),
                         class_names=list(summary.class_names), train_counts=list(summary.train_counts),
                         test_counts=list(summary.test_counts), image_size=form.image_size,
                         group_definition=group_definition(form, spec, len(summary.class_names)))
        session.add(row)
        session.flush()
        return row
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)
        raise


def get(session: Session, dataset_id: str) -> DatasetRow:
    row = session.get(DatasetRow, dataset_id)
    if row is None:
        raise ResourceNotFound(f"dataset {dataset_id} not found")
    return row


def list_datasets(session: Session, limit: int, offset: int) -> tuple[list[DatasetRow], int]:
    total = session.scalar(select(func.count()).select_from(DatasetRow)) or 0
    rows = session.scalars(select(DatasetRow).order_by(DatasetRow.created_at.desc()).limit(limit).offset(offset))
    return list(rows), total


def delete(session: Session, settings: Settings, dataset_id: str, force: bool = False) -> list[Path]:
    """Delete the row (with `force`, its runs too: none may be queued or training); returns the folders to
    remove once the deletion is committed: an uploaded archive's files and the deleted runs' folders. A
    dataset by reference leaves its files under the data root alone."""
    row = get(session, dataset_id)
    used_by = list(session.scalars(select(RunRow.id).where(RunRow.dataset_id == dataset_id)))
    if used_by and not force:
        raise ResourceConflict(f"dataset {dataset_id} is used by {len(used_by)} run(s); delete them first, or "
                               "delete with force=true to delete them too")
    deleted_runs = runs.delete(session, used_by, force=True)
    spec = row.dataset_spec()
    session.delete(row)
    session.flush()
    folders = [settings.artifacts.run(run_id).root for run_id in deleted_runs]
    return folders + ([settings.artifacts.resolve(spec.archive)] if isinstance(spec, ArchiveDataset) else [])
