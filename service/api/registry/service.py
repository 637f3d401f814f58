"""The model registry's use cases: names, numbered versions, aliases that move with a record of who moved
them and when. Take the session, never commit."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.api.models_api.service import get as get_model
from service.api.registry.schemas import (
    AliasEventPublic,
    AliasPublic,
    RegisteredModelCreate,
    RegisteredModelPublic,
    VersionPublic,
)
from service.store.errors import ResourceConflict, ResourceNotFound
from service.store.orm import AliasEventRow, ModelAliasRow, ModelRow, ModelVersionRow, RegisteredModelRow, utcnow


def get(session: Session, name: str) -> RegisteredModelRow:
    row = session.get(RegisteredModelRow, name)
    if row is None:
        raise ResourceNotFound(f"no registered model named {name!r}")
    return row


def to_public(session: Session, row: RegisteredModelRow) -> RegisteredModelPublic:
    history = session.scalars(select(AliasEventRow).where(AliasEventRow.name == row.name)
                              .order_by(AliasEventRow.at.desc(), AliasEventRow.id.desc())).all()
    return RegisteredModelPublic(
        name=row.name, description=row.description, created_at=row.created_at, created_by=row.created_by,
        latest_version=row.versions[-1].version if row.versions else None,
        versions=[VersionPublic.model_validate(v, from_attributes=True) for v in row.versions],
        aliases=[AliasPublic.model_validate(a, from_attributes=True) for a in row.aliases],
        alias_history=[AliasEventPublic.model_validate(e, from_attributes=True) for e in history])


def create(session: Session, body: RegisteredModelCreate, actor: str) -> RegisteredModelRow:
    if session.get(RegisteredModelRow, body.name) is not None:
        raise ResourceConflict(f"a registered model named {body.name!r} exists")
    if session.get(ModelRow, body.name) is not None:
        raise ResourceConflict(f"{body.name!r} is a model's id")
    row = RegisteredModelRow(name=body.name, description=body.description, created_by=actor)
    session.add(row)
    session.flush()
    return row


def list_all(session: Session, limit: int, offset: int) -> tuple[list[RegisteredModelRow], int]:
    total = session.scalar(select(func.count()).select_from(RegisteredModelRow)) or 0
    rows = session.scalars(select(RegisteredModelRow).order_by(RegisteredModelRow.name).limit(limit).offset(offset))
    return list(rows), total


def delete(session: Session, name: str) -> None:
    """The name, its versions, aliases and their history; the models stay."""
    session.delete(get(session, name))
    session.flush()


def add_version(session: Session, name: str, model_id: str, actor: str) -> ModelVersionRow:
    row = session.get(RegisteredModelRow, name, with_for_update=True)  # two adds never take the same number
    if row is None:
        raise ResourceNotFound(f"no registered model named {name!r}")
    get_model(session, model_id)  # 404 for an unknown model, 409 for a run without one
    latest = session.scalar(select(func.max(ModelVersionRow.version)).where(ModelVersionRow.name == name)) or 0
    version = ModelVersionRow(name=row.name, version=latest + 1, model_id=model_id, created_by=actor)
    session.add(version)
    session.flush()
    return version


def version_row(session: Session, name: str, version: int) -> ModelVersionRow:
    row = session.scalar(select(ModelVersionRow).where(ModelVersionRow.name == name,
                                                       ModelVersionRow.version == version))
    if row is None:
        raise ResourceNotFound(f"{name!r} has no version {version}")
    return row


def delete_version(session: Session, name: str, version: int) -> None:
    row = version_row(session, name, version)
    pointing = [a.alias for a in get(session, name).aliases if a.version == version]
    if pointing:
        raise ResourceConflict(f"alias(es) {', '.join(pointing)} point at version {version}; move them first")
    session.delete(row)
    session.flush()


def set_alias(session: Session, name: str, alias: str, version: int, actor: str) -> ModelAliasRow:
    """Point the alias at `version` (creating it), and record the move."""
    get(session, name)
    version_row(session, name, version)
    row = session.get(ModelAliasRow, (name, alias))
    now = utcnow()
    if row is None:
        row = ModelAliasRow(name=name, alias=alias, version=version, updated_at=now, updated_by=actor)
        session.add(row)
    else:
        row.version, row.updated_at, row.updated_by = version, now, actor
    session.add(AliasEventRow(name=name, alias=alias, version=version, at=now, by=actor))
    session.flush()
    return row


def remove_alias(session: Session, name: str, alias: str, actor: str) -> None:
    row = session.get(ModelAliasRow, (name, alias))
    if row is None:
        raise ResourceNotFound(f"{name!r} has no alias {alias!r}")
    session.delete(row)
    session.add(AliasEventRow(name=name, alias=alias, version=None, at=utcnow(), by=actor))
    session.flush()
