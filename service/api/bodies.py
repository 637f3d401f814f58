"""Request bodies that are JSON or multipart, validated by pydantic models in both cases, with
schema errors raised as FastAPI's own validation error, so every 422 has one shape. Each limit lives in the
model (or the type it uses), so the JSON path, the multipart path and the OpenAPI agree."""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData

Schema = TypeVar("Schema", bound=BaseModel)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _invalid(exc: ValidationError) -> RequestValidationError:
    """The same 422 as FastAPI gives a body it validates itself (one handler formats both)."""
    return RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)])


LARGE_BODY_BYTES = 64 * 2**10  # larger bodies are parsed off the event loop


async def parse_json(request: Request, schema: type[Schema]) -> Schema:
    body = await request.body()
    try:
        if len(body) > LARGE_BODY_BYTES:
            return await asyncio.to_thread(schema.model_validate_json, body)
        return schema.model_validate_json(body)
    except ValidationError as exc:
        raise _invalid(exc) from exc


def parse_form_fields(form: FormData, schema: type[Schema], file_fields: tuple[str, ...]) -> Schema:
    """The non-file fields of a multipart form, validated by `schema` (strings coerced as pydantic does)."""
    fields = {key: value for key, value in form.multi_items() if key not in file_fields and isinstance(value, str)}
    try:
        return schema.model_validate(fields)
    except ValidationError as exc:
        raise _invalid(exc) from exc


def json_or_multipart_body(json_schema: type[BaseModel], form_schema: type[BaseModel],
                           files: dict[str, dict[str, Any]]) -> dict:
    """The OpenAPI request body of an endpoint that takes either JSON or a multipart form with files."""
    form = form_schema.model_json_schema()
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": json_schema.model_json_schema()},
        "multipart/form-data": {"schema": {
            "type": "object", "required": [*files, *form.get("required", [])],
            "properties": {**files, **form["properties"]},
        }},
    }}}
