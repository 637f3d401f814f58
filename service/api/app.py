"""The FastAPI application: `create_app(settings)`; nothing is built at import time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.datasets.endpoints import router as datasets_router
from service.api.errors import install_error_handlers, problem
from service.api.health import router as health_router
from service.api.models_api.endpoints import predict_route, predict_router
from service.api.models_api.endpoints import router as models_router
from service.api.models_api.runtime import ModelCache
from service.api.observability import Metrics, RequestTimer
from service.api.oip.endpoints import infer_router, infer_routes
from service.api.oip.endpoints import router as oip_router
from service.api.registry.endpoints import router as registry_router
from service.api.runs.endpoints import router as runs_router
from service.api.ui import ContentSecurityPolicy, install_ui_and_docs
from service.store.queue import make_celery
from service.store.settings import Settings, get_settings
from service.store.sweep import sweep_once

log = logging.getLogger("h2t.api")


class _BodyTooLarge(Exception):
    pass


def body_limit(settings: Settings, path: str, content_type: bytes) -> int:
    """The largest request body a route can need: the predict limits for a predict request, the upload
    limit for a dataset archive, a few KB for anything else (a run, a builtin dataset). Larger bodies
    are refused with 413 before they are buffered."""
    if path.startswith("/v2/") and path.endswith("/infer"):
        return settings.infer_max_bytes
    if path.endswith("/predict"):
        return settings.predict_max_images * (settings.predict_max_image_bytes * 4 // 3 + 1024) + 64 * 1024
    if path in ("/v1/datasets", "/v1/models") and content_type.lower().startswith(b"multipart/form-data"):
        return settings.max_upload_bytes
    return settings.max_json_body_bytes


class BodySizeLimit:
    """Refuse request bodies over the route's limit with 413, by Content-Length or while streaming."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        max_bytes = body_limit(self.settings, scope.get("path", ""), headers.get(b"content-type", b""))
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            return await self._refuse(scope, receive, send, max_bytes)
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > max_bytes:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._refuse(scope, receive, send, max_bytes)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, max_bytes: int) -> None:
        response = problem(413, "Content too large", f"the request body exceeds {max_bytes} bytes",
                           scope.get("path", ""))
        await response(scope, receive, send)


async def _sweep_forever(app: FastAPI) -> None:
    settings = app.state.settings
    while True:
        await asyncio.sleep(settings.sweep_interval_s)
        try:
            await asyncio.to_thread(sweep_once, settings, app.state.celery)
        except Exception:  # the database or broker may be briefly down; try again next round
            log.exception("stale-run sweep failed")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    settings.require_api_keys()
    settings.ensure_local_dirs()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sweeper = asyncio.create_task(_sweep_forever(app))
        yield
        sweeper.cancel()
        await app.state.models.close()

    app = FastAPI(
        title="H2T service", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
        description="Long-tailed image classification with H2T: datasets, two-stage training runs, "
                    "per-epoch metrics, and models with head/medium/tail calibration. /v1 needs an X-API-Key header; "
                    "errors are RFC 9457 problem+json. The dashboard is at /ui/.",
    )
    app.state.settings = settings
    app.state.celery = make_celery(settings)
    app.state.metrics = metrics = Metrics(settings, app.state.celery)
    app.state.models = ModelCache(settings.model_cache_size, settings.predict_batching, settings.predict_max_batch,
                                  None if settings.predict_max_wait_ms is None else settings.predict_max_wait_ms / 1000,
                                  on_batch=metrics.predict_batch_size.observe,
                                  max_image_pixels=settings.max_image_pixels,
                                  intra_op_threads=settings.inference_threads)
    install_error_handlers(app)
    # the hot paths first, as plain routes: routes are matched in order, and these skip FastAPI's parameter
    # solving; their FastAPI twins after them document them in the OpenAPI schema
    app.router.routes.extend([predict_route, *infer_routes])
    app.include_router(predict_router)
    app.include_router(infer_router)
    app.include_router(health_router)
    app.include_router(datasets_router)
    app.include_router(runs_router)
    app.include_router(models_router)
    app.include_router(registry_router)
    app.include_router(oip_router)
    install_ui_and_docs(app)
    app.add_middleware(BodySizeLimit, settings=settings)
    app.add_middleware(RequestTimer, metrics=metrics)
    app.add_middleware(ContentSecurityPolicy)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics", response_class=PlainTextResponse)
    def prometheus_metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
