"""SIGTERM (docker stop) to a training worker: it checkpoints its epoch, requeues the run and exits;
the next worker continues from that checkpoint and nothing is lost or repeated."""

from __future__ import annotations

import signal

import pytest

from tests.integration.conftest import wait_for
from tests.integration.test_training_runs import _digits, _metric_keys, _run, _submit, metric_written_at

pytestmark = pytest.mark.integration


def test_sigterm_checkpoints_requeues_and_the_next_worker_finishes_the_run(client, start_worker):
    run = _submit(
        client, _digits(client), stage1={"epochs": 12, "batch_size": 32, "warmup_epochs": 1, "milestones": []}
    )
    first = start_worker()
    wait_for(lambda: _run(client, run["id"])["epoch"] >= 2, 180, "two epochs of stage 1")
    first.process.send_signal(signal.SIGTERM)
    assert first.process.wait(timeout=60) == 0  # a clean exit, within about one epoch
    assert "requeued" in first.log()
    stopped = _run(client, run["id"])
    assert stopped["status"] == "queued" and stopped["stage"] == 1
    before = metric_written_at(client, run["id"])

    second = start_worker()
    final = wait_for(
        lambda: (r := _run(client, run["id"]))["status"] in ("succeeded", "failed") and r,
        240,
        "the run to finish on the second worker",
    )
    assert final["status"] == "succeeded", final["error"]
    assert final["attempts"] == 2
    assert _metric_keys(client, run["id"]) == [(1, e) for e in range(1, 13)] + [(2, 1), (2, 2)]
    # the second worker resumed from the checkpoint: the first worker's epochs were not trained again
    after = metric_written_at(client, run["id"])
    assert len(before) >= 2 and all(after[key] == written for key, written in before.items())
    assert second.log().count("claimed run") == 1
