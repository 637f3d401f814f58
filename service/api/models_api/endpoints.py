from __future__ import annotations

import asyncio
import base64
import binascii
import shutil
import tempfile
from pathlib import Path

from fastapi import APIRouter, Request, Response, status
from fastapi.responses import FileResponse, JSONResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from models.contract.config import validation_sentence
from service.api.auth import KEY_SECURITY, ApiKey, require_key_inline
from service.api.bodies import json_or_multipart_body, media_type, parse_form_fields, parse_json
from service.api.deps import PageDep, SessionDep, SettingsDep
from service.api.errors import problems
from service.api.models_api import service
from service.api.models_api.runtime import ImageRefused, LoadedModel
from service.api.models_api.schemas import (
    CalibrationPublic,
    ImportManifest,
    ModelPublic,
    ModelsPublic,
    PredictJSON,
    PredictOptions,
    PredictResponse,
)
from service.api.observability import TimedRoute
from service.store.db import session_scope
from service.store.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType

router = APIRouter(prefix="/v1/models", tags=["models"], responses=problems(401, 422, 503))
# predict alone, for the OpenAPI schema (`predict_route`, at the end, serves it)
predict_router = APIRouter(prefix="/v1/models", tags=["models"], responses=problems(401, 422, 503))

_IMAGES_FIELD = "images"
_PREDICT_BODY = json_or_multipart_body(PredictJSON, PredictOptions, {
    _IMAGES_FIELD: {"type": "array", "items": {"type": "string", "format": "binary"}}})


_ONNX_FIELD, _MANIFEST_FIELD = "onnx", "manifest"


@router.post("", status_code=status.HTTP_201_CREATED, response_model=ModelPublic,
             responses=problems(400, 413, 415), summary="Import a model exported by `h2t models import`",
             openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                 "type": "object", "required": [_ONNX_FIELD, _MANIFEST_FIELD], "properties": {
                     _ONNX_FIELD: {"type": "string", "format": "binary", "description": "the ONNX file"},
                     _MANIFEST_FIELD: {"type": "string", "description": "JSON text: an ImportManifest"}}}}}}})
async def import_model(request: Request, response: Response, session: SessionDep, settings: SettingsDep,
                       _: ApiKey) -> ModelPublic:
    if media_type(request) != "multipart/form-data":
        raise UnsupportedMediaType("send multipart/form-data with an `onnx` file and a `manifest` field")
    async with request.form(max_files=1, max_fields=4) as form:  # closed on the way out: its spooled file
        upload, manifest_text = form.get(_ONNX_FIELD), form.get(_MANIFEST_FIELD)
        if not isinstance(upload, UploadFile) or not isinstance(manifest_text, str):
            raise InvalidInput(f"multipart body needs a file {_ONNX_FIELD!r} and a JSON field {_MANIFEST_FIELD!r}")
        try:
            manifest = ImportManifest.model_validate_json(manifest_text)
        except ValidationError as exc:
            raise InvalidInput(f"manifest: {validation_sentence(exc)}") from exc
        settings.artifacts.uploads.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=settings.artifacts.uploads) as scratch:
            path = Path(scratch) / "model.onnx"
            with open(path, "wb") as out:
                while chunk := await upload.read(1 << 20):
                    out.write(chunk)
            row = await asyncio.to_thread(service.import_model, session, settings, path, manifest)
    try:
        session.commit()
    except BaseException:
        shutil.rmtree(settings.artifacts.imported_model(row.id).parent, ignore_errors=True)
        raise
    response.headers["Location"] = f"/v1/models/{row.id}"
    return service.to_public(row, None)


@router.get("", response_model=ModelsPublic)
def list_models(session: SessionDep, _: ApiKey, page: PageDep) -> ModelsPublic:
    rows, total = service.list_models(session, page.limit, page.offset)
    return ModelsPublic(data=[service.to_public(m, r) for m, r in rows], count=total)


REF_HELP = ("a model's id, a registered name (its latest version), name@VERSION or name@ALIAS "
            "(GET /v1/registry/{name})")


@router.get("/{model_ref}", response_model=ModelPublic, responses=problems(404, 409), description=REF_HELP)
def get_model(model_ref: str, session: SessionDep, _: ApiKey) -> ModelPublic:
    return service.to_public(*service.get(session, service.resolve_reference(session, model_ref).model_id))


@router.delete("/{model_ref}", status_code=status.HTTP_204_NO_CONTENT, responses=problems(404, 409),
               summary="Delete a model and its ONNX file (its run stays); it is no longer served")
def delete_model(model_ref: str, request: Request, session: SessionDep, settings: SettingsDep, _: ApiKey) -> Response:
    model_id = model_ref  # deleting takes the model's own id, never a name or an alias that may move
    onnx_path = service.delete(session, model_id)
    session.commit()  # the file goes only once the rows are gone
    request.app.state.models.forget(model_id)
    settings.artifacts.resolve(onnx_path).unlink(missing_ok=True)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def _matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 If-None-Match: `*`, or any listed tag equal to ours (weak comparison)."""
    if not if_none_match:
        return False
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag in tags


@router.get("/{model_ref}/onnx", response_class=FileResponse, description=REF_HELP,
            summary="Download the ONNX file (ETag: its sha256; 304 on a matching If-None-Match)",
            responses={200: {"content": {"application/octet-stream": {}}}, 304: {"description": "unchanged"},
                       **problems(404, 409)})
def download_onnx(model_ref: str, request: Request, session: SessionDep, settings: SettingsDep,
                  _: ApiKey) -> Response:
    row, _run = service.get(session, service.resolve_reference(session, model_ref).model_id)
    etag = f'"{row.sha256}"'
    if _matches(request.headers.get("if-none-match"), etag):  # the client's copy is this very file
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers={"ETag": etag})
    return FileResponse(settings.artifacts.resolve(row.onnx_path), media_type="application/octet-stream",
                        filename=f"h2t-{row.id}.onnx", headers={"ETag": etag})


@router.get("/{model_ref}/calibration", response_model=CalibrationPublic, responses=problems(404, 409),
            description=REF_HELP,
            summary="Accuracy, ECE and reliability bins overall and per group, on the test split")
def get_calibration(model_ref: str, session: SessionDep, _: ApiKey) -> CalibrationPublic:
    row, _run = service.get(session, service.resolve_reference(session, model_ref).model_id)
    return CalibrationPublic(model_id=row.id, **row.calibration)


async def _read_images(request: Request, settings) -> tuple[list[bytes], int]:
    content_type = media_type(request)
    if content_type == "application/json":
        body = await parse_json(request, PredictJSON)
        if len(body.images) > settings.predict_max_images:
            raise PayloadTooLarge(f"at most {settings.predict_max_images} images per request")
        for i, text in enumerate(body.images):
            if len(text) > settings.predict_max_image_bytes * 4 // 3 + 4:
                raise PayloadTooLarge(f"image {i} is larger than {settings.predict_max_image_bytes} bytes")
        return await asyncio.to_thread(_decode_base64, body.images), body.top_k
    if content_type == "multipart/form-data":
        # closed on the way out: the parts are spooled files, which would otherwise wait for the collector
        async with request.form(max_files=settings.predict_max_images + 1, max_fields=10) as form:
            files = [f for f in form.getlist(_IMAGES_FIELD) if isinstance(f, UploadFile)]
            if not files:
                raise InvalidInput(f"multipart body needs one or more files named {_IMAGES_FIELD!r}")
            if len(files) > settings.predict_max_images:
                raise PayloadTooLarge(f"at most {settings.predict_max_images} images per request")
            top_k = parse_form_fields(form, PredictOptions, (_IMAGES_FIELD,)).top_k
            blobs = []
            for i, upload in enumerate(files):
                data = await upload.read(settings.predict_max_image_bytes + 1)
                if len(data) > settings.predict_max_image_bytes:
                    raise PayloadTooLarge(f"image {i} is larger than {settings.predict_max_image_bytes} bytes")
                blobs.append(data)
            return blobs, top_k
    raise UnsupportedMediaType(f"send multipart/form-data or application/json, not {content_type!r}")


def _decode_base64(texts: list[str]) -> list[bytes]:
    """Base64 to bytes: up to hundreds of MB, so the caller runs it off the event loop."""
    blobs = []
    for i, text in enumerate(texts):
        try:
            blobs.append(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise InvalidInput(f"image {i} is not valid base64") from exc
    return blobs


async def loaded_model(request: Request, model_ref: str) -> tuple[service.Resolved, LoadedModel]:
    """The model a reference names, loaded: the hot path of predict and of OIP infer. A loaded model named by
    its id needs no database; names and aliases are resolved through the cache's short memory."""
    settings = request.app.state.settings

    def resolve() -> service.Resolved:
        with session_scope(settings.database_url) as session:
            return service.resolve_reference(session, model_ref)

    def lookup(key: str) -> service.ServingRecord:
        with session_scope(settings.database_url) as session:
            return service.serving_record(session, key)

    resolved = await request.app.state.models.resolve(model_ref, resolve)
    return resolved, await request.app.state.models.get(resolved.model_id, lookup, settings.artifacts)


@predict_router.post("/{model_ref}/predict", response_model=PredictResponse,
                     openapi_extra={**_PREDICT_BODY, **KEY_SECURITY},
             responses=problems(400, 404, 409, 413, 415), description=REF_HELP,
             summary="Top-k classes per image, with the predicted class's group and that group's calibration")
async def predict(model_ref: str, request: Request) -> JSONResponse:
    # the hot path: a cached model needs no database session; the response is built as plain JSON
    require_key_inline(request)
    settings = request.app.state.settings
    resolved, loaded = await loaded_model(request, model_ref)
    model_id = resolved.model_id
    blobs, top_k = await _read_images(request, settings)
    try:  # decoded with the inference, off the event loop: one thread hop for the whole batch
        probs = await loaded.probabilities(blobs)
    except ImageRefused as exc:
        raise InvalidInput(str(exc)) from exc
    metrics = request.app.state.metrics
    metrics.predicted_images.inc(len(blobs))
    if loaded.batcher is None:
        metrics.predict_batch_size.observe(len(blobs))
    return JSONResponse({"model_id": model_id, "predictions": service.predictions(probs, loaded.record, top_k)})


async def _predict_route(request: Request) -> JSONResponse:
    return await predict(request.path_params["model_ref"], request)


# What serves predict: the same function as a plain Starlette route, without FastAPI's per-request solving of
# its parameters (a tenth of the endpoint's own time on a small model). The FastAPI route above only documents
# it in the OpenAPI schema: create_app puts this one first, so that one is never reached.
predict_route = TimedRoute("/v1/models/{model_ref}/predict", _predict_route, methods=["POST"], include_in_schema=False)
