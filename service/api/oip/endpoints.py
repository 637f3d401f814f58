"""The Open Inference Protocol (KServe v2 REST, as Triton and KServe serve it) beside our own API, so
`tritonclient`, KServe clients and platforms that speak it use our models unchanged.

- `GET /v2`, `/v2/health/live`, `/v2/health/ready`: server metadata and health (no key, like /healthz);
- `GET /v2/models/{name}[/versions/{version}]`, `.../ready`: a model's metadata and readiness;
- `POST /v2/models/{name}[/versions/{version}]/infer`: one input `image`, N x 3 x S x S, FP32 in [0, 1] (the
  ONNX model's own input) or UINT8 in [0, 255], as JSON `data` or binary tensor data.

A model is named as in `/v1/models/{ref}`: its id, a registered name (its latest version) or a name and a
version. Outputs: `probabilities` (FP32 N x C, softmax) and, per image, the predicted class (`predicted_class`,
INT64), its group (`predicted_group`, BYTES) and that group's test accuracy and ECE (`group_accuracy`,
`group_ece`, FP32; NaN, or null in JSON, for a group without test images): how far to trust the prediction.
Errors carry the protocol's `error` member beside the problem+json fields.
"""

from __future__ import annotations

import asyncio

import numpy as np
from fastapi import APIRouter, Request, Response
from sqlalchemy import text

from service.api.auth import KEY_SECURITY, ApiKey, require_key_inline
from service.api.errors import problems
from service.api.models_api import service
from service.api.models_api.endpoints import loaded_model
from service.api.models_api.runtime import LoadedModel
from service.api.observability import TimedRoute
from service.api.oip.codec import (
    HEADER_LENGTH,
    InferRequest,
    ProtocolError,
    Tensor,
    encode_infer_response,
    parse_infer_request,
)
from service.store.db import get_engine, session_scope
from service.store.errors import InvalidInput, ServiceUnavailable

router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"],
                   responses=problems(400, 401, 404, 409, 413, 422, 503))
infer_router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"],  # for the schema (see infer_routes)
                         responses=problems(400, 401, 404, 409, 413, 422, 503))

SERVER_NAME = "h2t"
EXTENSIONS = ["binary_tensor_data"]
OUTPUTS = ("probabilities", "predicted_class", "predicted_group", "group_accuracy", "group_ece")


@router.get("", summary="Server metadata")
def server_metadata(request: Request) -> dict:
    return {"name": SERVER_NAME, "version": request.app.version, "extensions": EXTENSIONS}


@router.get("/health/live", summary="The server is alive")
def live() -> dict:
    return {}


@router.get("/health/ready", summary="The server can serve: its store is reachable (else 503)")
def ready(request: Request) -> dict:
    try:
        with get_engine(request.app.state.settings.database_url).connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:  # any failure means not ready
        raise ServiceUnavailable(f"the database is unreachable ({type(exc).__name__})") from exc
    return {}


def _metadata(request: Request, name: str, version: str | None) -> dict:
    with session_scope(request.app.state.settings.database_url) as session:
        resolved = service.resolve_reference(session, name, version)
        row, _run = service.get(session, resolved.model_id)
        versions = service.versions_of(session, name)
    size = row.input_spec["height"]
    return {
        "name": name, "versions": versions, "platform": "onnxruntime_onnx",
        "inputs": [{"name": row.input_spec["name"], "datatype": "FP32", "shape": [-1, 3, size, size]}],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(row.class_names)]},
            {"name": "predicted_class", "datatype": "INT64", "shape": [-1]},
            {"name": "predicted_group", "datatype": "BYTES", "shape": [-1]},
            {"name": "group_accuracy", "datatype": "FP32", "shape": [-1]},
            {"name": "group_ece", "datatype": "FP32", "shape": [-1]},
        ],
    }


@router.get("/models/{name}", summary="Model metadata: its versions, input and outputs")
def model_metadata(name: str, request: Request, _: ApiKey) -> dict:
    return _metadata(request, name, None)


@router.get("/models/{name}/versions/{version}", summary="Metadata of one version")
def version_metadata(name: str, version: str, request: Request, _: ApiKey) -> dict:
    return _metadata(request, name, version)


async def _loaded(request: Request, name: str, version: str | None) -> tuple[service.Resolved, LoadedModel]:
    return await loaded_model(request, name if version is None else f"{name}@{version}")


@router.get("/models/{name}/ready", summary="The model can be served (its file is present and intact)")
async def model_ready(name: str, request: Request, _: ApiKey) -> dict:
    await _loaded(request, name, None)
    return {}


@router.get("/models/{name}/versions/{version}/ready", summary="One version can be served")
async def version_ready(name: str, version: str, request: Request, _: ApiKey) -> dict:
    await _loaded(request, name, version)
    return {}


def _images(infer: InferRequest, input_name: str, image_size: int, max_images: int) -> np.ndarray:
    """The request's one input as the model's float32 N x 3 x S x S batch."""
    if len(infer.inputs) != 1 or infer.inputs[0].name != input_name:
        raise ProtocolError(f"the model takes one input named {input_name!r}")
    tensor = infer.inputs[0]
    shape = tensor.array.shape
    if len(shape) != 4 or shape[1:] != (3, image_size, image_size) or not 1 <= shape[0] <= max_images:
        raise ProtocolError(f"input {input_name!r} must have shape [N, 3, {image_size}, {image_size}] with N from "
                            f"1 to {max_images}, not {list(shape)}")
    if tensor.datatype == "UINT8":
        return tensor.array.astype(np.float32) / np.float32(255)
    return np.ascontiguousarray(tensor.array, dtype=np.float32)


def _outputs(probs: np.ndarray, loaded: LoadedModel) -> list[Tensor]:
    record = loaded.record
    best = probs.argmax(axis=1)
    groups = [record.groups[c] for c in best]

    def calibration(key: str) -> np.ndarray:
        values = [record.group_calibration[g][key] for g in groups]
        return np.array([np.nan if v is None else v for v in values], dtype=np.float32)

    return [
        Tensor("probabilities", "FP32", probs.astype(np.float32, copy=False)),
        Tensor("predicted_class", "INT64", best.astype(np.int64)),
        Tensor("predicted_group", "BYTES", np.array([g.encode() for g in groups], dtype=object)),
        Tensor("group_accuracy", "FP32", calibration("accuracy")),
        Tensor("group_ece", "FP32", calibration("ece")),
    ]


async def _infer(request: Request, name: str, version: str | None) -> Response:
    settings = request.app.state.settings
    resolved, loaded = await _loaded(request, name, version)
    size = loaded.spec.image_size
    body = await request.body()
    try:
        infer = await asyncio.to_thread(parse_infer_request, body, request.headers.get(HEADER_LENGTH),
                                        settings.predict_max_images * 3 * size * size)
        images = _images(infer, "image", size, settings.predict_max_images)
        unknown = sorted(set(infer.outputs or ()) - set(OUTPUTS))
        if unknown:
            raise ProtocolError(f"unknown output(s) {', '.join(unknown)}; this model has {', '.join(OUTPUTS)}")
    except ProtocolError as exc:
        raise InvalidInput(str(exc)) from exc
    probs = await loaded.probabilities(images)
    metrics = request.app.state.metrics
    metrics.predicted_images.inc(len(images))
    if loaded.batcher is None:
        metrics.predict_batch_size.observe(len(images))
    tensors = [t for t in _outputs(probs, loaded) if infer.outputs is None or t.name in infer.outputs]
    asked = infer.outputs or {}
    binary = {t.name: infer.binary_outputs if asked.get(t.name) is None else asked[t.name] for t in tensors}
    answer, headers = encode_infer_response(name, resolved.version, infer.id, tensors, binary)
    return Response(answer, headers=headers)


@infer_router.post("/models/{name}/infer", summary="Inference on the latest version (JSON or binary tensors)",
                   response_class=Response, openapi_extra=KEY_SECURITY)
async def infer(name: str, request: Request) -> Response:
    require_key_inline(request)
    return await _infer(request, name, None)


@infer_router.post("/models/{name}/versions/{version}/infer", summary="Inference on one version",
                   response_class=Response, openapi_extra=KEY_SECURITY)
async def infer_version(name: str, version: str, request: Request) -> Response:
    require_key_inline(request)
    return await _infer(request, name, version)


async def _infer_route(request: Request) -> Response:
    require_key_inline(request)
    return await _infer(request, request.path_params["name"], request.path_params.get("version"))


# What serves infer: plain Starlette routes, without FastAPI's per-request solving of parameters; the FastAPI
# routes above only document them in the OpenAPI schema (create_app puts these first; see predict_route).
infer_routes = [TimedRoute("/v2/models/{name}/infer", _infer_route, methods=["POST"], include_in_schema=False),
                TimedRoute("/v2/models/{name}/versions/{version}/infer", _infer_route, methods=["POST"],
                      include_in_schema=False)]
