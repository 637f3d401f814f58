"""Runs through the real API, PostgreSQL, Redis and worker processes."""

from __future__ import annotations

import signal

import pytest
from sqlalchemy import func, select

from service.store.db import session_scope
from service.store.orm import ArtifactRow, MetricRow
from service.store.queue import TRAIN_TASK, make_celery
from tests.integration.conftest import wait_for

pytestmark = pytest.mark.integration

TINY_RUN = {
    "augment": {"horizontal_flip": False},
    "stage1": {"epochs": 3, "batch_size": 32, "warmup_epochs": 1, "milestones": [], "lr": 0.02},
    "stage2": {"epochs": 2, "batch_size": 32},
}


def _digits(client) -> str:
    response = client.post("/v1/datasets", json={"builtin": "digits", "imbalance_factor": 0.05})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _submit(client, dataset_id: str, **overrides) -> dict:
    response = client.post("/v1/runs", json={"dataset_id": dataset_id, **TINY_RUN, **overrides})
    assert response.status_code == 202, response.text
    return response.json()


def _run(client, run_id: str) -> dict:
    return client.get(f"/v1/runs/{run_id}").json()


def metric_written_at(client, run_id: str) -> dict[tuple[int, int], str]:
    """When each (stage, epoch) row was last written: a rewritten row means that epoch was retrained."""
    rows = client.get(f"/v1/runs/{run_id}/metrics").json()["data"]
    return {(m["stage"], m["epoch"]): m["created_at"] for m in rows}


def _metric_keys(client, run_id: str) -> list[tuple[int, int]]:
    return [(m["stage"], m["epoch"]) for m in client.get(f"/v1/runs/{run_id}/metrics").json()["data"]]


def test_a_run_goes_queued_running_succeeded_with_one_metric_row_per_epoch(client, settings, start_worker):
    run = _submit(client, _digits(client))
    assert run["status"] == "queued" and run["latest_metrics"] is None
    start_worker()
    seen = {run["status"]}

    def finished():
        current = _run(client, run["id"])
        seen.add(current["status"])
        return current["status"] in ("succeeded", "failed", "cancelled") and current

    final = wait_for(finished, 180, "the run to finish", interval=0.05)
    assert final["status"] == "succeeded", final["error"]
    assert {"queued", "running", "succeeded"} <= seen
    assert _metric_keys(client, run["id"]) == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2)]
    assert (final["stage"], final["epoch"], final["total_epochs"]) == (2, 2, 2)
    assert final["latest_metrics"]["stage"] == 2 and final["latest_metrics"]["epoch"] == 2
    assert final["attempts"] == 1 and final["finished_at"] and final["started_at"]
    with session_scope(settings.database_url) as session:
        kinds = set(session.scalars(select(ArtifactRow.kind).where(ArtifactRow.run_id == run["id"])))
    assert kinds == {"stage1_checkpoint", "stage2_checkpoint", "onnx"}
    assert final["model_id"] == run["id"]

    # stage1_from: a second stage 2 on the finished backbone trains stage 2 only
    second = _submit(
        client, final["dataset_id"], stage1_from=run["id"], stage2={"method": "crt", "epochs": 1, "batch_size": 32}
    )
    done = wait_for(
        lambda: (r := _run(client, second["id"]))["status"] in ("succeeded", "failed") and r, 120, "the stage1_from run"
    )
    assert done["status"] == "succeeded", done["error"]
    assert _metric_keys(client, second["id"]) == [(2, 1)]


def test_cancel_stops_a_running_run_within_one_epoch(client, start_worker):
    run = _submit(
        client, _digits(client), stage1={"epochs": 60, "batch_size": 32, "warmup_epochs": 1, "milestones": []}
    )
    start_worker()
    wait_for(lambda: _run(client, run["id"])["epoch"] >= 1, 120, "the first epoch")
    response = client.post(f"/v1/runs/{run['id']}/cancel")
    assert response.status_code == 202 and response.json()["status"] in ("cancelling", "cancelled")
    epochs_at_cancel = len(_metric_keys(client, run["id"]))
    final = wait_for(lambda: (r := _run(client, run["id"]))["status"] == "cancelled" and r, 60, "cancelled")
    rows = _metric_keys(client, run["id"])
    assert len(rows) <= epochs_at_cancel + 1  # stopped at the end of the epoch under way
    assert final["finished_at"] is not None
    assert client.post(f"/v1/runs/{run['id']}/cancel").status_code == 409


def test_cancel_of_a_queued_run_is_immediate(client):
    run = _submit(client, _digits(client))  # no worker is running
    response = client.post(f"/v1/runs/{run['id']}/cancel")
    assert response.status_code == 202 and response.json()["status"] == "cancelled"


def test_a_killed_worker_leaves_a_run_that_the_next_worker_finishes_from_its_checkpoint(client, settings, start_worker):
    run = _submit(
        client, _digits(client), stage1={"epochs": 12, "batch_size": 32, "warmup_epochs": 1, "milestones": []}
    )
    first = start_worker()
    wait_for(lambda: _run(client, run["id"])["epoch"] >= 3, 180, "three epochs of stage 1")
    first.stop(signal.SIGKILL)
    killed_at = len(_metric_keys(client, run["id"]))
    before = metric_written_at(client, run["id"])
    assert _run(client, run["id"])["status"] == "running"  # nobody has noticed yet

    second = start_worker()
    final = wait_for(
        lambda: (r := _run(client, run["id"]))["status"] in ("succeeded", "failed") and r,
        240,
        "the run to finish on the second worker",
    )
    assert final["status"] == "succeeded", final["error"]
    assert final["attempts"] == 2
    keys = _metric_keys(client, run["id"])
    assert keys == [(1, e) for e in range(1, 13)] + [(2, 1), (2, 2)]  # none missing, none twice
    with session_scope(settings.database_url) as session:
        rows = session.scalar(select(func.count()).select_from(MetricRow).where(MetricRow.run_id == run["id"]))
    assert rows == 14
    # the second worker resumed from the last checkpoint: at most the epoch under way when the first
    # worker died (reported, not yet checkpointed) is trained again; every earlier row is untouched
    after = metric_written_at(client, run["id"])
    rewritten = [key for key, written in before.items() if after[key] != written]
    assert rewritten in ([], [max(before)])
    assert second.log().count("claimed run") == 1 and killed_at >= 3


def test_two_workers_never_train_the_same_run(client, settings, start_worker):
    run = _submit(client, _digits(client))
    celery = make_celery(settings)
    for _ in range(3):  # duplicate deliveries of the same task
        celery.send_task(TRAIN_TASK, args=[run["id"]], queue=settings.queue_name)
    workers = [start_worker(), start_worker()]
    final = wait_for(
        lambda: (r := _run(client, run["id"]))["status"] in ("succeeded", "failed") and r, 180, "the run to finish"
    )
    assert final["status"] == "succeeded", final["error"]
    wait_for(lambda: sum(w.log().count("not claimable") for w in workers) == 3, 60, "the duplicates to be skipped")
    assert sum(w.log().count("claimed run") for w in workers) == 1
    assert final["attempts"] == 1
    assert _metric_keys(client, run["id"]) == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2)]
