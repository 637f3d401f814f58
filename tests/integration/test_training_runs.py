"""Runs through the real API, PostgreSQL, Redis and worker processes."""

from __future__ import annotations

import signal

import pytest

from service.store.orm import TERMINAL
from service.store.queue import TRAIN_TASK, make_celery
from tests.helpers import (
    create_tiny_dataset,
    get_run,
    metric_keys,
    metric_written_at,
    submit_run,
    wait_for,
    wait_for_run,
)
from tests.integration.conftest import stored_artifacts, stored_metric_rows

pytestmark = pytest.mark.integration

TINY_KEYS = [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2)]  # (stage, epoch) of the tiny run's 3 + 2 epochs


def test_a_run_goes_queued_running_succeeded_with_one_metric_row_per_epoch(client, settings, start_worker):
    run = submit_run(client, create_tiny_dataset(client))
    assert run["status"] == "queued" and run["latest_metrics"] is None
    start_worker()
    seen = {run["status"]}

    def finished():
        current = get_run(client, run["id"])
        seen.add(current["status"])
        return current["status"] in TERMINAL and current

    final = wait_for(finished, 180, "the run to finish", interval=0.05)
    assert final["status"] == "succeeded", final["error"]
    assert seen == {"queued", "running", "succeeded"}
    assert metric_keys(client, run["id"]) == TINY_KEYS
    assert (final["stage"], final["epoch"], final["total_epochs"]) == (2, 2, 2)
    assert final["latest_metrics"]["stage"] == 2 and final["latest_metrics"]["epoch"] == 2
    assert final["attempts"] == 1 and final["finished_at"] and final["started_at"]
    assert stored_artifacts(settings.database_url) == [
        (run["id"], k) for k in ("onnx", "stage1_checkpoint", "stage2_checkpoint")
    ]
    assert final["model_id"] == run["id"]

    # stage1_from: a second stage 2 on the finished backbone trains stage 2 only
    second = submit_run(client, final["dataset_id"], stage1_from=run["id"], stage2={"method": "crt", "epochs": 1})
    done = wait_for_run(client, second["id"], ("succeeded",), 120)
    assert metric_keys(client, second["id"]) == [(2, 1)]
    assert stored_metric_rows(settings.database_url) == sorted(
        [(run["id"], *k) for k in TINY_KEYS] + [(second["id"], 2, 1)]
    )
    assert done["model_id"] == second["id"]
    assert sorted(r["id"] for r in client.get("/v1/runs").json()["data"]) == sorted([run["id"], second["id"]])


def test_cancel_stops_a_running_run_within_one_epoch(client, settings, start_worker):
    run = submit_run(client, create_tiny_dataset(client), stage1={"epochs": 60})
    start_worker()
    wait_for(lambda: get_run(client, run["id"])["epoch"] >= 1, 120, "the first epoch")
    response = client.post(f"/v1/runs/{run['id']}/cancel")
    assert response.status_code == 202 and response.json()["status"] in ("cancelling", "cancelled")
    epochs_at_cancel = len(metric_keys(client, run["id"]))
    final = wait_for_run(client, run["id"], ("cancelled",), 60)
    rows = metric_keys(client, run["id"])
    assert len(rows) <= epochs_at_cancel + 1  # stopped at the end of the epoch under way
    assert rows == [(1, e) for e in range(1, len(rows) + 1)]  # stage 1 only, no epoch missing or twice
    assert final["finished_at"] is not None and final["model_id"] is None
    assert stored_artifacts(settings.database_url) == []  # a cancelled run exports no model
    assert client.post(f"/v1/runs/{run['id']}/cancel").status_code == 409


def test_cancel_of_a_queued_run_is_immediate(client):
    run = submit_run(client, create_tiny_dataset(client))  # no worker is running
    response = client.post(f"/v1/runs/{run['id']}/cancel")
    assert response.status_code == 202 and response.json()["status"] == "cancelled"
    assert get_run(client, run["id"])["status"] == "cancelled"


def test_a_killed_worker_leaves_a_run_that_the_next_worker_finishes_from_its_checkpoint(client, settings, start_worker):
    run = submit_run(client, create_tiny_dataset(client), stage1={"epochs": 12})
    first = start_worker()
    wait_for(lambda: get_run(client, run["id"])["epoch"] >= 3, 180, "three epochs of stage 1")
    first.stop(signal.SIGKILL)
    killed_at = len(metric_keys(client, run["id"]))
    before = metric_written_at(client, run["id"])
    assert get_run(client, run["id"])["status"] == "running"  # nobody has noticed yet

    second = start_worker()
    final = wait_for_run(client, run["id"], ("succeeded",), 240)
    assert final["attempts"] == 2
    keys = [(1, e) for e in range(1, 13)] + [(2, 1), (2, 2)]
    assert metric_keys(client, run["id"]) == keys
    assert stored_metric_rows(settings.database_url) == [(run["id"], *k) for k in keys]  # none missing, none twice
    # the second worker resumed from the last checkpoint: at most the epoch under way when the first
    # worker died (reported, not yet checkpointed) is trained again; every earlier row is untouched
    after = metric_written_at(client, run["id"])
    rewritten = [key for key, written in before.items() if after[key] != written]
    assert rewritten in ([], [max(before)])
    assert second.log().count("claimed run") == 1 and killed_at >= 3  # waited for three epochs above


def test_two_workers_never_train_the_same_run(client, settings, start_worker):
    run = submit_run(client, create_tiny_dataset(client))
    celery = make_celery(settings)
    for _ in range(3):  # duplicate deliveries of the same task
        celery.send_task(TRAIN_TASK, args=[run["id"]], queue=settings.queue_name)
    workers = [start_worker(), start_worker()]
    final = wait_for_run(client, run["id"], ("succeeded",), 180)
    wait_for(lambda: sum(w.log().count("not claimable") for w in workers) == 3, 60, "the duplicates to be skipped")
    assert sum(w.log().count("claimed run") for w in workers) == 1
    assert final["attempts"] == 1
    assert stored_metric_rows(settings.database_url) == [(run["id"], *k) for k in TINY_KEYS]
    assert stored_artifacts(settings.database_url) == [
        (run["id"], k) for k in ("onnx", "stage1_checkpoint", "stage2_checkpoint")
    ]
