"""Request bodies that are JSON or multipart: the media type, and JSON validated into a schema
with schema errors turned into the same 422 problem+json as everywhere else."""

from __future__ import annotations

from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from service.api.errors import InvalidInput

Schema = TypeVar("Schema", bound=BaseModel)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def parse_json(request: Request, schema: type[Schema], what: str) -> Schema:
    try:
        return schema.model_validate_json(await request.body())
    except ValidationError as exc:
        raise InvalidInput(f"invalid {what}",
                           errors=[{"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()]) from exc
