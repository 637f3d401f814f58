"""Prometheus metrics of the API: request latency by route, predict batch sizes and, read from the
store and the broker at scrape time, runs by status, epochs trained and queue depth."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from sqlalchemy import func, select
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.store.db import session_scope
from service.store.orm import MetricRow, ModelRow, RunRow, RunStatus
from service.store.settings import Settings

log = logging.getLogger("h2t.metrics")


class StoreCollector:
    """Gauges and counters whose truth lives in the SQL store and the broker (shared by all
    API and worker processes), read when Prometheus scrapes."""

    def __init__(self, settings: Settings, celery) -> None:
        self.settings, self.celery = settings, celery

    def collect(self) -> Iterator:
        up = GaugeMetricFamily("h2t_store_up", "1 when the store answered this scrape")
        try:
            with session_scope(self.settings.database_url) as session:
                by_status = dict(session.execute(select(RunRow.status, func.count()).group_by(RunRow.status)).all())
                epochs = session.scalar(select(func.count()).select_from(MetricRow)) or 0
                models = session.scalar(select(func.count()).select_from(ModelRow)) or 0
        except Exception:  # a scrape must not fail because the database blinked
            log.exception("metrics: the store did not answer")
            up.add_metric([], 0)
            yield up
        else:
            up.add_metric([], 1)
            yield up
            runs = GaugeMetricFamily("h2t_runs", "training runs by status", labels=["status"])
            for status in RunStatus:
                runs.add_metric([status.value], by_status.get(status, 0))
            yield runs
            yield CounterMetricFamily("h2t_epochs_trained", "epochs trained and recorded, all runs and stages",
                                      value=epochs)
            yield GaugeMetricFamily("h2t_models", "exported models", value=models)
        depth = GaugeMetricFamily("h2t_queue_depth", "training tasks waiting in the broker", labels=["queue"])
        try:
            with self.celery.connection_for_read() as connection:
                # not passive: an empty Redis queue has no key, and a passive declare would call it missing
                declared = connection.default_channel.queue_declare(queue=self.settings.queue_name, durable=True,
                                                                    auto_delete=False)
                depth.add_metric([self.settings.queue_name], declared.message_count)
        except Exception:
            log.warning("metrics: queue depth unavailable", exc_info=True)
            depth.add_metric([self.settings.queue_name], float("nan"))
        yield depth


class Metrics:
    """One registry per app, so several apps in one process (tests) never collide."""

    def __init__(self, settings: Settings, celery) -> None:
        self.registry = CollectorRegistry()
        self.request_seconds = Histogram(
            "h2t_http_request_duration_seconds", "HTTP request latency by route", ["method", "route", "status"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=self.registry)
        self.predict_batch_size = Histogram(
            "h2t_predict_batch_size", "images per onnxruntime inference call of the predict endpoint",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self.predicted_images = Counter("h2t_predicted_images", "images answered by predict", registry=self.registry)
        self.registry.register(StoreCollector(settings, celery))


class TimedRoute(Route):
    """A plain Starlette route (no FastAPI parameter solving) that names itself in the request's scope, as the
    FastAPI routes do, so RequestTimer labels it by its template too."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = self
        await super().handle(scope, receive, send)


class RequestTimer:
    """Times every request by its route template (not the raw path, which holds ids)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def tracking_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.request_seconds.labels(scope["method"], route, str(status)).observe(
                time.perf_counter() - started)
