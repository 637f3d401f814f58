"""Runs on several devices through the real stack: a `h2t worker` owning 2 devices (CPU processes, gloo)
trains a run on 2 ranks, survives the kill of one rank by resuming from the last checkpoint, stops every
rank on cancel and SIGTERM, and leaves no process behind; the API refuses a run no worker can take."""

from __future__ import annotations

import os
import signal
import time
from datetime import timedelta

import pytest
import torch

from models.core.train import load_checkpoint
from service.store import workers
from service.store.db import session_scope
from service.store.orm import RunRow, utcnow
from tests.helpers import (
    create_tiny_dataset,
    live_descendants,
    metric_keys,
    submit_run,
    wait_for,
    wait_for_run,
)

pytestmark = pytest.mark.integration

TWO_DEVICES = {"H2T_WORKER_DEVICES": "2"}
LOSS_TOLERANCE = 0.15  # relative, per epoch: each device normalises its 16 of the batch's 32 images


def _ranks_of(worker_pid: int) -> list[int]:
    """The training processes (ranks) a worker has spawned, oldest first."""
    return sorted(pid for pid, command in live_descendants(worker_pid) if "multiprocessing" in command)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _losses(client, run_id: str) -> list[float]:
    return [m["loss"] for m in client.get(f"/v1/runs/{run_id}/metrics").json()["data"]]


def _weights(settings, run_id: str) -> dict[str, torch.Tensor]:
    return load_checkpoint(settings.artifacts.run(run_id).checkpoint(2))["model"]


def _start_two_device_worker(settings, start_worker):
    """A worker owning 2 devices, once it has announced itself (runs on 2 devices are refused before)."""
    worker = start_worker(**TWO_DEVICES)

    def announced() -> bool:
        with session_scope(settings.database_url) as session:
            return workers.most_devices(session, utcnow() - timedelta(minutes=1)) == 2

    wait_for(announced, 60, "the worker to announce its 2 devices")
    return worker


def _started_training(client, run_id: str, worker_pid: int) -> list[int]:
    """Waits for the run's first epoch row, then returns its ranks' pids."""
    # a CIFAR-100-LT epoch on two ranks sharing a small CPU in fp32 can take minutes; only the wait grows
    wait_for(lambda: metric_keys(client, run_id), 600, f"the first epoch of run {run_id}")
    return wait_for(lambda: _ranks_of(worker_pid), 10, "the ranks of the run")


def test_a_run_asking_for_more_devices_than_any_worker_owns_is_refused(client, settings):
    dataset_id = create_tiny_dataset(client)
    body = {"dataset_id": dataset_id, "devices": 2}
    refused = client.post("/v1/runs", json=body)
    assert refused.status_code == 422 and refused.headers["content-type"] == "application/problem+json"
    assert "asks for 2 devices" in refused.json()["detail"] and "no worker" in refused.json()["detail"]
    with session_scope(settings.database_url) as session:
        assert session.query(RunRow).count() == 0  # nothing half-written
        workers.announce(session, "gpu-host:1", 2, "cuda", utcnow())
    too_many = client.post("/v1/runs", json={**body, "devices": 3})
    assert too_many.status_code == 422
    assert "the largest worker seen in the last 24 h owns 2" in too_many.json()["detail"]
    assert client.post("/v1/runs", json=body).status_code == 202
    assert client.post("/v1/runs", json={**body, "devices": 0}).status_code == 422


def test_two_ranks_train_the_one_device_run_and_a_killed_rank_resumes_to_the_same_model(
        client, settings, start_worker):
    worker = _start_two_device_worker(settings, start_worker)
    dataset_id = create_tiny_dataset(client)
    config = {"precision": "fp32", "stage1": {"epochs": 4}}
    one = submit_run(client, dataset_id, **config)["id"]
    two = submit_run(client, dataset_id, devices=2, **config)["id"]
    wait_for_run(client, one, {"succeeded"})
    wait_for_run(client, two, {"succeeded"})
    assert metric_keys(client, two) == metric_keys(client, one) == [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2)]
    for a, b in zip(_losses(client, one), _losses(client, two), strict=True):
        assert abs(a - b) <= LOSS_TOLERANCE * a
    assert client.get(f"/v1/models/{two}").status_code == 200
    assert "training run" in worker.log() and not live_descendants(worker.process.pid)

    killed = submit_run(client, dataset_id, devices=2, **config)["id"]
    ranks = _started_training(client, killed, worker.process.pid)
    assert len(ranks) == 2
    os.kill(ranks[-1], signal.SIGKILL)
    wait_for(lambda: not any(_alive(pid) for pid in ranks), 10, "the other rank to end")
    run = wait_for_run(client, killed, {"succeeded"})
    assert run["attempts"] == 2 and "was killed by signal 9" in worker.log()
    assert not live_descendants(worker.process.pid)
    resumed, uninterrupted = _weights(settings, killed), _weights(settings, two)
    assert all(torch.equal(resumed[name], uninterrupted[name]) for name in uninterrupted)


def test_cancel_and_sigterm_reach_every_rank(client, settings, start_worker):
    worker = _start_two_device_worker(settings, start_worker)
    dataset_id = create_tiny_dataset(client)
    long = {"precision": "fp32", "devices": 2, "stage1": {"epochs": 50}}

    cancelled = submit_run(client, dataset_id, **long)["id"]
    ranks = _started_training(client, cancelled, worker.process.pid)
    assert client.post(f"/v1/runs/{cancelled}/cancel").status_code == 202
    wait_for_run(client, cancelled, {"cancelled"}, timeout=60)
    wait_for(lambda: not any(_alive(pid) for pid in ranks), 10, "every rank to end")
    assert not live_descendants(worker.process.pid)

    stopped = submit_run(client, dataset_id, **long)["id"]
    ranks = _started_training(client, stopped, worker.process.pid)
    started = time.monotonic()
    worker.process.send_signal(signal.SIGTERM)
    worker.process.wait(timeout=120)
    assert not any(_alive(pid) for pid in ranks) and time.monotonic() - started < 120
    run = wait_for_run(client, stopped, {"queued"}, timeout=30)
    assert run["epoch"] >= 1 and "requeued" in worker.log()
    assert settings.artifacts.run(stopped).checkpoint(1).exists()


def _worker_children(parent_pid: int) -> list[int]:
    """The `h2t worker` processes a worker with H2T_WORKER_PROCESSES started."""
    return sorted(pid for pid, command in live_descendants(parent_pid)
                  if command.endswith("h2t worker --log-level INFO") and pid != parent_pid)


def test_worker_processes_share_a_device_train_runs_at_once_and_stop_together(client, settings, start_worker):
    worker = start_worker(H2T_WORKER_PROCESSES="2")
    children = wait_for(lambda: len(_worker_children(worker.process.pid)) == 2 and _worker_children(
        worker.process.pid), 60, "two worker processes")
    dataset_id = create_tiny_dataset(client)
    ids = [submit_run(client, dataset_id, stage1={"epochs": 8})["id"] for _ in range(2)]

    def both_running() -> bool:
        runs = [client.get(f"/v1/runs/{run_id}").json() for run_id in ids]
        return all(r["status"] == "running" and r["epoch"] >= 1 for r in runs) and len({r["worker"] for r in runs}) == 2

    wait_for(both_running, 120, "both runs training at once, each by its own process")
    os.kill(children[0], signal.SIGKILL)  # a process that dies on its own is started again
    wait_for(lambda: len(_worker_children(worker.process.pid)) == 2
             and _worker_children(worker.process.pid) != children, 30, "the killed process to be replaced")
    for run_id in ids:  # the killed process's run is requeued by the sweep once its heartbeat is stale
        wait_for_run(client, run_id, {"succeeded"})

    worker.process.send_signal(signal.SIGTERM)
    assert worker.process.wait(timeout=60) == 0
    assert not live_descendants(worker.process.pid)


def test_a_killed_worker_takes_its_training_ranks_with_it_at_once(client, settings, start_worker):
    worker = _start_two_device_worker(settings, start_worker)
    # CIFAR-100-LT: epochs long enough (many seconds) that ranks left to themselves would train on
    created = client.post("/v1/datasets", json={"builtin": "cifar100", "imbalance_factor": 0.01})
    assert created.status_code == 201, created.text
    run_id = submit_run(client, created.json()["id"], devices=2, stage1={"epochs": 3, "batch_size": 128})["id"]
    ranks = _started_training(client, run_id, worker.process.pid)
    time.sleep(1.0)  # well inside the second epoch
    worker.process.kill()  # no warning, no cleanup: the kernel ends the ranks (their parent-death signal)
    worker.process.wait()
    killed_at = time.monotonic()
    wait_for(lambda: not any(_alive(pid) for pid in ranks), 10, "the orphaned ranks to end", interval=0.05)
    assert time.monotonic() - killed_at < 2
