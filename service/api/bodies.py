"""Request bodies that are JSON or multipart, validated by pydantic models in both cases, with
schema errors raised as FastAPI's own validation error, so every 422 has one shape. Each limit lives in the
model (or the type it uses), so the JSON path, the multipart path and the OpenAPI agree."""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.datastructures import FormData

Schema = TypeVar("Schema", bound=BaseModel)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _invalid(exc: ValidationError, tagged_union: bool = False) -> RequestValidationError:
    """The same 422 as FastAPI gives a body it validates itself (one handler formats both). A tagged
    union puts the variant's tag first in each location; the body names it by its key already, so it is
    dropped: a field's location is the same whichever schema validated it."""
    return RequestValidationError([{**e, "loc": ("body", *(e["loc"][1:] if tagged_union else e["loc"]))}
                                   for e in exc.errors(include_url=False)])


LARGE_BODY_BYTES = 64 * 2**10  # larger bodies are parsed off the event loop


async def parse_json(request: Request, schema: type[Schema] | TypeAdapter[Any]) -> Any:
    """The JSON body validated by a model, or by an adapter of a union of models tagged by a key."""
    body = await request.body()
    tagged_union = isinstance(schema, TypeAdapter)
    validate = schema.validate_json if tagged_union else schema.model_validate_json
    try:
        if len(body) > LARGE_BODY_BYTES:
            return await asyncio.to_thread(validate, body)
        return validate(body)
    except ValidationError as exc:
        raise _invalid(exc, tagged_union) from exc


def parse_form_fields(form: FormData, schema: type[Schema], file_fields: tuple[str, ...]) -> Schema:
    """The non-file fields of a multipart form, validated by `schema` (strings coerced as pydantic does)."""
    fields = {key: value for key, value in form.multi_items() if key not in file_fields and isinstance(value, str)}
    try:
        return schema.model_validate(fields)
    except ValidationError as exc:
        raise _invalid(exc) from exc


def _inlined(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON schema with its `$defs` references replaced by the definitions (none is recursive): a schema
    embedded in an OpenAPI operation cannot refer to its own `#/$defs/...`."""
    defs = schema.get("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return {**walk(defs[ref.removeprefix("#/$defs/")]),
                        **{key: walk(value) for key, value in node.items() if key != "$ref"}}
            return {key: walk(value) for key, value in node.items() if key != "$defs"}
        return [walk(value) for value in node] if isinstance(node, list) else node

    return walk(schema)


def json_or_multipart_body(json_schema: type[BaseModel] | TypeAdapter[Any], form_schema: type[BaseModel],
                           files: dict[str, dict[str, Any]]) -> dict:
    """The OpenAPI request body of an endpoint that takes either JSON or a multipart form with files."""
    form = form_schema.model_json_schema()
    body = json_schema.json_schema() if isinstance(json_schema, TypeAdapter) else json_schema.model_json_schema()
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": _inlined(body)},
        "multipart/form-data": {"schema": {
            "type": "object", "required": [*files, *form.get("required", [])],
            "properties": {**files, **form["properties"]},
        }},
    }}}
