"""Faults of the servers the service runs on, injected into servers this test starts itself (never the
machine's shared ones): the store is the truth of what must run, so a broker that forgets its queue
strands no run."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis
from fastapi.testclient import TestClient

from service.api.app import create_app
from tests.helpers import create_tiny_dataset, get_run, submit_run, wait_for_run
from tests.integration.conftest import API_KEY, spawn_worker, stored_metric_rows

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _redis_without_persistence(port: int) -> Iterator[subprocess.Popen]:
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed")
    process = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_connect_timeout=1)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.RedisError:
            if time.monotonic() > deadline:
                process.kill()
                raise
            time.sleep(0.1)
    try:
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)


def test_runs_queued_when_the_broker_restarts_empty_all_finish_once(settings, tmp_path):
    port = _free_port()
    settings = settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{port}/0", "resend_after_s": 2.0})
    with _redis_without_persistence(port):
        with TestClient(create_app(settings), headers={"X-API-Key": API_KEY}) as client:
            dataset = create_tiny_dataset(client)
            ids = [submit_run(client, dataset)["id"] for _ in range(3)]
        assert redis.Redis(port=port).llen(settings.queue_name) == 3
    with _redis_without_persistence(port):  # the same broker back, its queue gone
        assert redis.Redis(port=port).llen(settings.queue_name) == 0
        worker = spawn_worker(settings, tmp_path / "worker.log")  # its sweep resends what the store says is queued
        try:
            with TestClient(create_app(settings), headers={"X-API-Key": API_KEY}) as client:
                try:
                    finals = [wait_for_run(client, run_id, ("succeeded",), 300) for run_id in ids]
                except AssertionError as exc:
                    raise AssertionError(f"{exc}\n{worker.log()[-3000:]}") from None
                assert [get_run(client, run_id)["attempts"] for run_id in ids] == [1, 1, 1]
        finally:
            worker.stop(signal.SIGKILL)
    assert [f["status"] for f in finals] == ["succeeded"] * 3
    tiny_epochs = [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2)]  # the tiny run: 3 + 2 epochs, each recorded once
    assert stored_metric_rows(settings.database_url) == sorted((r, s, e) for r in ids for s, e in tiny_epochs)


def test_a_cancel_right_after_submission_always_ends_cancelled(client, start_worker, settings):
    """Twenty submit-then-cancel pairs against a live worker: whether the cancel lands before or after
    the claim, no run is ever trained to success and every cancel is visible at once."""
    dataset = create_tiny_dataset(client)
    worker = start_worker()
    ids = []
    for _ in range(20):
        run_id = submit_run(client, dataset)["id"]
        response = client.post(f"/v1/runs/{run_id}/cancel")
        assert response.status_code == 202 and response.json()["status"] in ("cancelled", "cancelling")
        assert get_run(client, run_id)["status"] == response.json()["status"]  # the write is visible at once
        ids.append(run_id)
    try:
        finals = [wait_for_run(client, run_id, ("cancelled",), 120) for run_id in ids]
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{worker.log()[-3000:]}") from None
    assert [(f["status"], f["model_id"]) for f in finals] == [("cancelled", None)] * 20
    assert client.get("/v1/models").json()["count"] == 0
