"""Watching and stopping a run while it trains: the event stream, progress inside an epoch with its time
estimates, a cancel that stops between two steps, and a forced cancel."""

from __future__ import annotations

import json
import time

import pytest

from tests.helpers import create_tiny_dataset, get_run, submit_run, wait_for, wait_for_run

pytestmark = pytest.mark.integration


def _events(client, run_id: str) -> list[tuple[str, dict]]:
    """Every (event, data) of the run's stream, until the server ends it."""
    received, kind = [], None
    with client.stream("GET", f"/v1/runs/{run_id}/events") as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                received.append((kind, json.loads(line.removeprefix("data: "))))
    return received


def _cifar_run(client, **overrides) -> str:
    """A CIFAR-100-LT run: epochs of many seconds on a CPU, so there is time to act inside one."""
    created = client.post("/v1/datasets", json={"builtin": "cifar100", "imbalance_factor": 0.01})
    assert created.status_code == 201, created.text
    return submit_run(client, created.json()["id"], stage1={"epochs": 3, "batch_size": 128}, **overrides)["id"]


def test_the_event_stream_follows_a_run_to_its_end(client, start_worker):
    run_id = submit_run(client, create_tiny_dataset(client))["id"]
    start_worker()
    events = _events(client, run_id)
    statuses = [data["status"] for kind, data in events if kind == "status"]
    assert statuses[0] in ("queued", "running") and statuses[-1] == "succeeded" and events[-1][0] == "status"
    epochs = [(data["stage"], data["epoch"]) for kind, data in events if kind == "epoch"]
    assert epochs == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2)]
    rows = client.get(f"/v1/runs/{run_id}/metrics").json()["data"]
    assert [data for kind, data in events if kind == "epoch"] == rows
    # a finished run's stream: its whole history, then the final status, then the end
    replay = _events(client, run_id)
    assert [kind for kind, _ in replay] == ["epoch"] * 5 + ["status"]
    assert client.get("/v1/runs/no-such-run/events").status_code == 404


def test_a_cancel_stops_a_run_between_two_steps_within_seconds(client, start_worker):
    run_id = _cifar_run(client)
    worker = start_worker()
    run = wait_for(lambda: (r := get_run(client, run_id))["progress"] and r, 180, "progress inside the first epoch")
    progress = run["progress"]
    assert (progress["stage"], progress["epoch"], progress["epochs"]) == (1, 1, 3)
    assert 0 < progress["step"] < progress["steps"] and progress["images_per_second"] > 0
    assert progress["run_eta_s"] > progress["stage_eta_s"] > 0
    asked = time.monotonic()
    assert client.post(f"/v1/runs/{run_id}/cancel").json()["status"] == "cancelling"
    wait_for_run(client, run_id, {"cancelled"}, timeout=30)
    assert time.monotonic() - asked < 5, "a cancel waits for a step, not for the end of the epoch"
    assert client.get(f"/v1/runs/{run_id}/metrics").json()["count"] == 0  # it stopped inside epoch 1
    assert get_run(client, run_id)["progress"] is None
    assert "cancelled" in wait_for(worker.log, 10, "the worker's log")


def test_a_forced_cancel_ends_a_running_run_at_once_and_the_worker_moves_on(client, start_worker):
    run_id = _cifar_run(client)
    worker = start_worker()
    wait_for(lambda: get_run(client, run_id)["status"] == "running", 180, "the run to start")
    forced = client.post(f"/v1/runs/{run_id}/cancel", params={"force": "true"})
    assert forced.status_code == 202 and forced.json()["status"] == "cancelled"
    # the worker learns at its next report that the run is no longer its own, and takes the next one
    after = submit_run(client, create_tiny_dataset(client))["id"]
    wait_for_run(client, after, {"succeeded"}, timeout=240)
    assert f"run {run_id} lost" in worker.log()
    final = get_run(client, run_id)
    assert final["status"] == "cancelled" and final["model_id"] is None


def test_the_run_log_has_a_line_per_epoch_and_following_it_ends_with_the_run(client, start_worker):
    run_id = submit_run(client, create_tiny_dataset(client))["id"]
    start_worker()
    with client.stream("GET", f"/v1/runs/{run_id}/logs", params={"follow": "true"}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
        followed = list(response.iter_lines())
    assert get_run(client, run_id)["status"] == "succeeded"  # the stream ended with the run
    assert f"claimed run {run_id}" in followed[0] and followed[-1].endswith(f"run {run_id} succeeded")
    epoch_lines = [line for line in followed if " epoch " in line and "loss" in line]
    assert [line.split("INFO ", 1)[1].split(" loss")[0] for line in epoch_lines] == [
        f"run {run_id} stage 1 epoch   1/3", f"run {run_id} stage 1 epoch   2/3", f"run {run_id} stage 1 epoch   3/3",
        f"run {run_id} stage 2 epoch   1/2", f"run {run_id} stage 2 epoch   2/2"]
    assert not any("\x1b[" in line for line in followed)  # plain text, no terminal colours
    assert client.get(f"/v1/runs/{run_id}/logs").text.splitlines() == followed
    assert client.get("/v1/runs/no-such-run/logs").status_code == 404
