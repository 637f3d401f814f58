"""A run's live streams, polled every second: its events (server-sent) and its log as it grows.

The event stream shows what changed in the store.

Events, each `event: <kind>` with one JSON `data:` line:
- `status`: the run's status and progress counters (`status`, `stage`, `epoch`, `total_epochs`, `error`),
  first on connecting and then on every change;
- `progress`: a StepProgress (models/contract/metrics.py) every few seconds while an epoch trains;
- `epoch`: a metric row (the GET /v1/runs/{id}/metrics row) as each epoch lands; on connecting, every row so
  far. A row rewritten after a worker was lost (the epoch replayed) is sent again.
The stream ends after the status event of a finished run (succeeded, failed, cancelled). A comment line
keeps idle connections open through proxies.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from service.api.runs.service import TRAINING, metric_public
from service.store.db import session_scope
from service.store.orm import TERMINAL, MetricRow, RunRow

POLL_S = 1.0
KEEPALIVE_S = 15.0


@dataclass(frozen=True)
class _Snapshot:
    status: dict
    progress: dict | None
    epochs: list[tuple[datetime, str]]  # (written at, metric row as JSON), in the order written


def _snapshot(database_url: str, run_id: str, since: datetime | None) -> _Snapshot:
    with session_scope(database_url) as session:
        run = session.get(RunRow, run_id)
        query = select(MetricRow).where(MetricRow.run_id == run_id)
        if since is not None:
            query = query.where(MetricRow.created_at > since)
        rows = session.scalars(query.order_by(MetricRow.created_at, MetricRow.stage, MetricRow.epoch)).all()
        status = {"status": run.status.value, "stage": run.stage, "epoch": run.epoch,
                  "total_epochs": run.total_epochs, "error": run.error}
        return _Snapshot(status, run.progress if run.status in TRAINING else None,
                         [(row.created_at, metric_public(row).model_dump_json()) for row in rows])


def _event(kind: str, data: str) -> str:
    return f"event: {kind}\ndata: {data}\n\n"


async def run_events(database_url: str, run_id: str, poll_s: float = POLL_S) -> AsyncIterator[str]:
    """The event stream of a run that exists (the endpoint checked)."""
    sent_status, sent_progress, since = None, None, None
    last_sent = time.monotonic()
    while True:
        snapshot = await run_in_threadpool(_snapshot, database_url, run_id, since)
        out = []
        for written_at, row in snapshot.epochs:
            out.append(_event("epoch", row))
            since = written_at if since is None or written_at > since else since
        if snapshot.progress is not None and snapshot.progress != sent_progress:
            sent_progress = snapshot.progress
            out.append(_event("progress", json.dumps(snapshot.progress)))
        if snapshot.status != sent_status:
            sent_status = snapshot.status
            out.append(_event("status", json.dumps(snapshot.status)))
        if out:
            yield "".join(out)
            last_sent = time.monotonic()
        elif time.monotonic() - last_sent >= KEEPALIVE_S:
            yield ": keep-alive\n\n"
            last_sent = time.monotonic()
        if snapshot.status["status"] in {s.value for s in TERMINAL}:
            return
        await asyncio.sleep(poll_s)


def new_log_text(path: Path, offset: int) -> tuple[bytes, bool]:
    """The whole lines written to `path` past `offset`, and whether the file exists."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
    except FileNotFoundError:
        return b"", False
    return chunk[: chunk.rfind(b"\n") + 1], True


def _status(database_url: str, run_id: str) -> str:
    with session_scope(database_url) as session:
        return session.scalar(select(RunRow.status).where(RunRow.id == run_id)).value


async def follow_log(database_url: str, run_id: str, path: Path, poll_s: float = POLL_S) -> AsyncIterator[bytes]:
    """The run's log as it grows, line by line, until the run has finished and every line was sent. The worker
    writes its last line (the outcome) just after the run's status changes: the stream ends only when a read
    one poll after the run was seen finished finds nothing new."""
    offset, finished_before = 0, False
    while True:
        finished = await run_in_threadpool(_status, database_url, run_id) in {s.value for s in TERMINAL}
        chunk, _ = await run_in_threadpool(new_log_text, path, offset)  # read after the status: nothing is missed
        if chunk:
            offset += len(chunk)
            yield chunk
        elif finished and finished_before:
            return
        finished_before = finished
        await asyncio.sleep(poll_s)
