"""Every error turned into RFC 9457 problem+json, in one place: domain errors (service.store.errors),
schema errors, HTTP errors, the store being unreachable (503 with Retry-After), values the store
cannot keep (422), and bugs (500 with an error id that is also in the log). `problems(...)` documents
the error statuses of a route in the OpenAPI, each one a `Problem` body."""

from __future__ import annotations

import logging
import uuid
from http import HTTPStatus
from typing import Any

import sqlalchemy.exc
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from service.store.errors import AppError

PROBLEM_JSON = "application/problem+json"


RETRY_AFTER_S = 5  # what a client is told to wait while the store is unreachable
log = logging.getLogger("h2t.api")


class Problem(BaseModel):
    """RFC 9457 problem details: the body of every error answer, as `problem()` writes it."""

    model_config = ConfigDict(extra="allow")  # members a problem adds: a 422's `errors`, a 500's `error_id`, ...

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    instance: str


_PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
_PROBLEM_HEADERS = {
    401: {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "the header that carries the key"}},
    503: {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds to wait before trying again"}},
}


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route (or a router) for the error statuses it answers: each an
    application/problem+json `Problem`, so the OpenAPI lists every status a client can get."""
    return {status: {"description": HTTPStatus(status).phrase, "content": {PROBLEM_JSON: {"schema": _PROBLEM_REF}},
                      **({"headers": _PROBLEM_HEADERS[status]} if status in _PROBLEM_HEADERS else {})}
            for status in statuses}


def problem(status: int, title: str, detail: str, instance: str, headers: dict[str, str] | None = None,
            **extra: object) -> JSONResponse:
    if instance.startswith("/v2"):  # Open Inference Protocol clients read the message from `error`
        extra = {**extra, "error": detail}
    body = Problem(title=title, status=status, detail=detail, instance=instance, **extra).model_dump()
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "X-API-Key"}
    return JSONResponse(jsonable_encoder(body), status_code=status, media_type=PROBLEM_JSON, headers=headers)


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """The methods the OpenAPI declares for a concrete path, all of them: a 405's `Allow` (RFC 9110)."""
    for template, operations in app.openapi()["paths"].items():
        if compile_path(template)[0].match(path):
            return sorted(method.upper() for method in operations)
    return []


def install_error_handlers(app: FastAPI) -> None:
    """Turns every error into problem+json, and adds the `Problem` schema that `problems()` refers to
    to the app's OpenAPI components."""
    build_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schemas = build_openapi().setdefault("components", {}).setdefault("schemas", {})
            schemas["Problem"] = Problem.model_json_schema()
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(AppError)
    async def _app_error(request: Request, exc: AppError) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if exc.status == 503 else None
        return problem(exc.status, exc.title, exc.detail, request.url.path, headers, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        return problem(422, "Unprocessable content", "the request does not match the schema", request.url.path,
                       errors=errors)

    @app.exception_handler(sqlalchemy.exc.OperationalError)
    @app.exception_handler(sqlalchemy.exc.InterfaceError)
    async def _store_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("the store is unreachable: %s", type(exc).__name__)
        return problem(503, "Service unavailable", "the database is unreachable; try again shortly", request.url.path,
                       headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(sqlalchemy.exc.DataError)
    async def _unstorable(request: Request, exc: Exception) -> JSONResponse:
        return problem(422, "Unprocessable content", "the request holds a value the database cannot store "
                       "(for example a NUL character or a number out of range)", request.url.path)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        error_id = uuid.uuid4().hex
        log.error("unhandled error %s on %s %s", error_id, request.method, request.url.path, exc_info=exc,
                  extra={"error_id": error_id})
        return problem(500, "Internal server error", f"an unexpected error; quote error id {error_id}",
                       request.url.path, error_id=error_id)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        title = HTTPStatus(exc.status_code).phrase if exc.status_code in HTTPStatus._value2member_map_ else "Error"
        headers = exc.headers
        # Starlette's Allow names the methods of the one route it tried, not of every route on the path
        if exc.status_code == 405 and (methods := allowed_methods(request.app, request.scope["path"])):
            headers = {**(headers or {}), "Allow": ", ".join(methods)}
        return problem(exc.status_code, title, str(exc.detail), request.url.path, headers)
