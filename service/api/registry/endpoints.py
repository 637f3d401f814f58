"""The model registry: `/v1/registry/{name}` with numbered versions and aliases that move with one call.

Predict, the model endpoints and the Open Inference Protocol accept `name` (the latest version), `name@N`
and `name@alias` wherever they accept a model's id.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, Response, status

from service.api.auth import ApiKey, actor
from service.api.deps import PageDep, SessionDep
from service.api.errors import problems
from service.api.registry import service
from service.api.registry.schemas import (
    AliasSet,
    RegisteredModelCreate,
    RegisteredModelPublic,
    RegisteredModelsPublic,
    VersionCreate,
)
from service.store.orm import REGISTRY_NAME_PATTERN

router = APIRouter(prefix="/v1/registry", tags=["registry"], responses=problems(400, 401, 404, 413, 422, 503))
AliasName = Annotated[str, Path(pattern=REGISTRY_NAME_PATTERN, description="e.g. production, staging")]


@router.post("", status_code=status.HTTP_201_CREATED, response_model=RegisteredModelPublic,
             responses=problems(409), summary="Register a model name")
def create(body: RegisteredModelCreate, request: Request, response: Response, session: SessionDep,
           key: ApiKey) -> RegisteredModelPublic:
    row = service.create(session, body, actor(request, key))
    session.commit()
    response.headers["Location"] = f"/v1/registry/{row.name}"
    return service.to_public(session, row)


@router.get("", response_model=RegisteredModelsPublic, summary="Registered models, by name")
def list_registered(session: SessionDep, _: ApiKey, page: PageDep) -> RegisteredModelsPublic:
    rows, total = service.list_all(session, page.limit, page.offset)
    return RegisteredModelsPublic(data=[service.to_public(session, r) for r in rows], count=total)


@router.get("/{name}", response_model=RegisteredModelPublic, summary="A name's versions, aliases and their moves")
def get_registered(name: str, session: SessionDep, _: ApiKey) -> RegisteredModelPublic:
    return service.to_public(session, service.get(session, name))


@router.delete("/{name}", status_code=status.HTTP_204_NO_CONTENT,
               summary="Remove a name with its versions and aliases (the models stay)")
def delete_registered(name: str, session: SessionDep, _: ApiKey) -> Response:
    service.delete(session, name)
    session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{name}/versions", status_code=status.HTTP_201_CREATED, response_model=RegisteredModelPublic,
             responses=problems(409), summary="Add a model as the next version")
def add_version(name: str, body: VersionCreate, request: Request, session: SessionDep,
                key: ApiKey) -> RegisteredModelPublic:
    service.add_version(session, name, body.model_id, actor(request, key))
    session.commit()
    return service.to_public(session, service.get(session, name))


@router.delete("/{name}/versions/{version}", status_code=status.HTTP_204_NO_CONTENT, responses=problems(409),
               summary="Remove a version (409 while an alias points at it; the model stays)")
def delete_version(name: str, version: int, session: SessionDep, _: ApiKey) -> Response:
    service.delete_version(session, name, version)
    session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.put("/{name}/aliases/{alias}", response_model=RegisteredModelPublic,
            summary="Point an alias at a version (created if new); the move is recorded with who and when")
def set_alias(name: str, alias: AliasName, body: AliasSet, request: Request, session: SessionDep,
              key: ApiKey) -> RegisteredModelPublic:
    service.set_alias(session, name, alias, body.version, actor(request, key))
    session.commit()
    return service.to_public(session, service.get(session, name))


@router.delete("/{name}/aliases/{alias}", status_code=status.HTTP_204_NO_CONTENT,
               summary="Remove an alias (recorded)")
def remove_alias(name: str, alias: str, request: Request, session: SessionDep, key: ApiKey) -> Response:
    service.remove_alias(session, name, alias, actor(request, key))
    session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)
