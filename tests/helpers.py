"""Helpers shared by the test suites: the one tiny run configuration, polling until something holds,
and the few REST calls the integration tests repeat.

Nothing here starts servers or needs them; the REST helpers take any client with `get`/`post`
(a FastAPI TestClient or an httpx.Client).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Collection
from typing import Any

from service.store.orm import TERMINAL

# The builtin long-tailed digits set (10 classes, small images): a run trains in seconds on a CPU.
TINY_DATASET: dict[str, Any] = {"builtin": "digits", "imbalance_factor": 0.05}

# A RunConfig (models/contract/config.py) as its JSON body: 3 stage-1 and 2 stage-2 epochs, no mirroring
# (it changes what a digit is), a short warmup and no lr steps.
_TINY_RUN: dict[str, Any] = {
    "augment": {"horizontal_flip": False},
    "stage1": {"epochs": 3, "batch_size": 32, "warmup_epochs": 1, "milestones": [], "lr": 0.02},
    "stage2": {"epochs": 2, "batch_size": 32},
}

def _merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def tiny_run_config(**overrides: Any) -> dict[str, Any]:
    """A fresh copy of the tiny run's configuration (RunConfig fields, no dataset), with `overrides`.

    A dict override merges into the section of the same name, so `tiny_run_config(stage1={"epochs": 12})`
    keeps the rest of the tiny stage 1; any other value replaces the key (e.g. `stage1_from=run_id`).
    """
    return _merged(_TINY_RUN, overrides)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Calls `predicate` until it returns something truthy, and returns that; fails after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def get_run(client: Any, run_id: str) -> dict[str, Any]:
    response = client.get(f"/v1/runs/{run_id}")
    assert response.status_code == 200, response.text
    return response.json()


def wait_for_run(
    client: Any,
    run_id: str,
    statuses: Collection[str] = TERMINAL,
    timeout: float = 240,
    interval: float = 0.2,
) -> dict[str, Any]:
    """Polls GET /v1/runs/{run_id} until the run's status is one of `statuses`, and returns the run.

    Fails at once when the run ends (succeeded, failed, cancelled) in a status not asked for,
    with the run's error, rather than waiting out the timeout.
    """
    deadline = time.monotonic() + timeout
    while True:
        run = get_run(client, run_id)
        if run["status"] in statuses:
            return run
        if run["status"] in TERMINAL:
            raise AssertionError(f"run {run_id} ended {run['status']}, not {' or '.join(statuses)}: {run['error']}")
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout:.0f} s waiting for run {run_id} to be {' or '.join(statuses)}; "
                f"it is {run['status']} at stage {run['stage']} epoch {run['epoch']}"
            )
        time.sleep(interval)


def create_tiny_dataset(client: Any) -> str:
    """POST /v1/datasets of TINY_DATASET; returns the new dataset's id."""
    response = client.post("/v1/datasets", json=TINY_DATASET)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def submit_run(client: Any, dataset_id: str, **overrides: Any) -> dict[str, Any]:
    """POST /v1/runs of the tiny run on `dataset_id` with `overrides` (see tiny_run_config); returns the run."""
    response = client.post("/v1/runs", json={"dataset_id": dataset_id, **tiny_run_config(**overrides)})
    assert response.status_code == 202, response.text
    return response.json()


def metric_keys(client: Any, run_id: str) -> list[tuple[int, int]]:
    """The run's metric rows as (stage, epoch), in the order the API lists them."""
    return [(m["stage"], m["epoch"]) for m in client.get(f"/v1/runs/{run_id}/metrics").json()["data"]]


def metric_written_at(client: Any, run_id: str) -> dict[tuple[int, int], str]:
    """When each (stage, epoch) row was last written: a rewritten row means that epoch was retrained."""
    rows = client.get(f"/v1/runs/{run_id}/metrics").json()["data"]
    return {(m["stage"], m["epoch"]): m["created_at"] for m in rows}


def metric_sample(text: str, sample: str) -> float:
    """The value of one sample, named with its labels exactly as they are printed (e.g.
    `h2t_runs{status="queued"}`), in a Prometheus text exposition; it must be there exactly once."""
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.rsplit(" ", 1)[0] == sample]
    assert len(values) == 1, f"{sample} appears {len(values)} times in the metrics"
    return values[0]


def live_descendants(pid: int | None = None) -> list[tuple[int, str]]:
    """(pid, command line) of every live process below `pid` (default: this one), read from /proc, except
    multiprocessing's resource tracker, which lives as long as its parent by design. Zombies count as gone."""
    import os

    root = os.getpid() if pid is None else pid
    children: dict[int, list[int]] = {}
    commands: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # it ended while we looked
            continue
        state, parent = stat.rsplit(")", 1)[1].split()[:2]
        if state != "Z":
            children.setdefault(int(parent), []).append(int(entry))
            commands[int(entry)] = command
    found, todo = [], list(children.get(root, []))
    while todo:
        child = todo.pop()
        todo.extend(children.get(child, []))
        if "resource_tracker" not in commands[child]:
            found.append((child, commands[child]))
    return found
