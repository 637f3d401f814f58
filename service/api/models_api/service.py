"""Model use cases: lookup (a model's id is its run's id), listing, and shaping predictions."""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import delete as delete_rows
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models.contract.layout import ONNX_KIND
from models.contract.metrics import GROUP_NAMES, GroupSummary
from models.contract.onnx_model import load_session, session_spec, sha256_file
from service.api.models_api.schemas import ImportManifest, ModelPublic, Parity
from service.store.errors import InvalidInput, ResourceConflict, ResourceNotFound
from service.store.orm import (
    ArtifactRow,
    ModelAliasRow,
    ModelRow,
    ModelVersionRow,
    RegisteredModelRow,
    RunRow,
    RunStatus,
)
from service.store.settings import Settings


def get(session: Session, model_id: str) -> tuple[ModelRow, RunRow | None]:
    """The model and the run that trained it (None for an imported model)."""
    row = session.get(ModelRow, model_id)
    if row is None:
        run = session.get(RunRow, model_id)
        if run is None:
            raise ResourceNotFound(f"model {model_id} not found")
        if run.status == RunStatus.succeeded:
            raise ResourceNotFound(f"model {model_id} was deleted (its run is kept)")
        raise ResourceConflict(f"run {model_id} is {run.status}: it has no exported model yet")
    return row, session.get(RunRow, row.run_id) if row.run_id is not None else None


@dataclass(frozen=True)
class Resolved:
    model_id: str
    version: str  # the registry's version number, or "1" for a model named by its id


def resolve_reference(session: Session, ref: str, version: str | None = None) -> Resolved:
    """The model a reference names: a model's id, a registered name (its latest version), `name@3` (a version)
    or `name@production` (an alias); `version` (the Open Inference Protocol's) is the part after the @."""
    if version is None and "@" in ref:
        ref, version = ref.split("@", 1)
    registered = session.get(RegisteredModelRow, ref)
    if registered is None:
        if version not in (None, "1"):
            get(session, ref)  # 404 (or 409) for what is neither a name nor a model
            raise ResourceNotFound(f"model {ref} has one version, 1; {version!r} names none")
        get(session, ref)
        return Resolved(ref, "1")
    if version is None:
        if not registered.versions:
            raise ResourceNotFound(f"registered model {ref!r} has no version yet")
        latest = registered.versions[-1]
        return Resolved(latest.model_id, str(latest.version))
    if not version.isdigit():
        alias = session.get(ModelAliasRow, (ref, version))
        if alias is None:
            raise ResourceNotFound(f"{ref!r} has no alias {version!r}")
        version = str(alias.version)
    found = next((v for v in registered.versions if str(v.version) == version), None)
    if found is None:
        raise ResourceNotFound(f"{ref!r} has no version {version}")
    return Resolved(found.model_id, version)


def versions_of(session: Session, ref: str) -> list[str]:
    """The versions an Open Inference Protocol client may name: a registered name's, or "1" for a model id."""
    registered = session.get(RegisteredModelRow, ref.split("@", 1)[0])
    return [str(v.version) for v in registered.versions] if registered is not None else ["1"]


def delete(session: Session, model_id: str) -> str:
    """Delete a model's row and its ONNX artifact row (the run stays, with no model); returns the stored path
    of the file to remove once the deletion is committed. A registered version is a conflict."""
    row, _ = get(session, model_id)
    registered = session.scalars(select(ModelVersionRow).where(ModelVersionRow.model_id == model_id)).first()
    if registered is not None:
        raise ResourceConflict(f"model {model_id} is version {registered.version} of {registered.name!r}; remove "
                               f"it from the registry first (DELETE /v1/registry/{registered.name}/versions/"
                               f"{registered.version})")
    onnx_path = row.onnx_path
    if row.run_id is not None:
        session.execute(delete_rows(ArtifactRow).where(ArtifactRow.run_id == row.run_id,
                                                       ArtifactRow.kind == ONNX_KIND))
    session.delete(row)
    session.flush()
    return onnx_path


def to_public(row: ModelRow, run: RunRow | None) -> ModelPublic:
    return ModelPublic(
        id=row.id, run_id=row.run_id, dataset_id=run.dataset_id if run is not None else None, origin=row.origin,
        num_classes=len(row.class_names),
        class_names=row.class_names, groups=row.groups, input=row.input_spec, onnx_sha256=row.sha256,
        size_bytes=row.size_bytes, parity=Parity(max_abs_diff=row.parity_max_abs_diff, images=row.parity_images),
        calibration={name: GroupSummary.model_validate(g) for name, g in row.calibration["groups"].items()},
        created_at=row.created_at,
    )


def list_models(session: Session, limit: int, offset: int) -> tuple[list[tuple[ModelRow, RunRow | None]], int]:
    total = session.scalar(select(func.count()).select_from(ModelRow)) or 0
    rows = session.execute(select(ModelRow, RunRow).outerjoin(RunRow, RunRow.id == ModelRow.run_id)
                           .order_by(ModelRow.created_at.desc()).limit(limit).offset(offset)).all()
    return [(m, r) for m, r in rows], total


@dataclass(frozen=True)
class ServingRecord:
    """What predict needs of a model, read once from the store and kept with the loaded session
    (a model never changes after its run succeeded)."""

    model_id: str
    onnx_path: str
    sha256: str
    class_names: tuple[str, ...]
    groups: tuple[str, ...]
    group_calibration: dict[str, dict[str, float | None]]  # group -> n, accuracy, ece (null: empty group)

    @classmethod
    def from_row(cls, row: ModelRow) -> ServingRecord:
        return cls(row.id, row.onnx_path, row.sha256, tuple(row.class_names), tuple(row.groups),
                   {name: GroupSummary.model_validate(g).model_dump() for name, g in row.calibration["groups"].items()})


def serving_record(session: Session, model_id: str) -> ServingRecord:
    row, _run = get(session, model_id)
    return ServingRecord.from_row(row)


def predictions(probs: np.ndarray, record: ServingRecord, top_k: int) -> list[dict]:
    """Top-k classes per image, and the predicted class's group with that group's test calibration
    (shaped as schemas.Prediction)."""
    k = min(top_k, probs.shape[1])
    out = []
    for index, p in enumerate(probs):
        order = np.argsort(-p, kind="stable")[:k]
        best = int(order[0])
        group = record.groups[best]
        out.append({
            "index": index,
            "top_k": [{"class_index": int(c), "label": record.class_names[c], "probability": float(p[c])}
                      for c in order],
            "predicted": {"class_index": best, "label": record.class_names[best], "probability": float(p[best]),
                          "group": group, "group_calibration": record.group_calibration[group]},
        })
    return out


def import_model(session: Session, settings: Settings, upload: Path, manifest: ImportManifest) -> ModelRow:
    """A model exported by `h2t models import`: the file must load in onnxruntime and carry h2t's metadata,
    and the calibration must be per group of its classes; moved into the artifact store only then. Nothing
    stays on failure."""
    try:
        spec = session_spec(load_session(upload))
    except KeyError as exc:
        raise InvalidInput(f"the ONNX file lacks h2t's metadata ({exc}): export it with `h2t models import`") from exc
    except Exception as exc:  # onnxruntime's errors for a file that is no model
        raise InvalidInput(f"the file is not an ONNX model onnxruntime can load: {type(exc).__name__}") from exc
    if set(manifest.calibration.groups) != {"overall", *GROUP_NAMES}:
        raise InvalidInput("manifest.calibration.groups must hold overall, many, medium and few")
    if len(spec.groups) != len(spec.class_names) or set(spec.groups) - set(GROUP_NAMES):
        raise InvalidInput("the model's metadata gives no many/medium/few group for each class")
    model_id = str(uuid.uuid4())
    final = settings.artifacts.imported_model(model_id)
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        shutil.move(upload, final)
        row = ModelRow(id=model_id, run_id=None, origin=manifest.origin, onnx_path=settings.artifacts.relative(final),
                       sha256=sha256_file(final), size_bytes=final.stat().st_size,
                       parity_max_abs_diff=manifest.parity.max_abs_diff, parity_images=manifest.parity.images,
                       input_spec=spec.input_description(), class_names=list(spec.class_names),
                       groups=list(spec.groups), calibration=manifest.calibration.model_dump(mode="json"))
        session.add(row)
        session.flush()
        return row
    except BaseException:
        shutil.rmtree(final.parent, ignore_errors=True)
        raise
