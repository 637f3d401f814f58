"""SIGTERM (docker stop) to a training worker: it checkpoints its epoch, requeues the run and exits;
the next worker continues from that checkpoint and nothing is lost or repeated."""

from __future__ import annotations

import signal

import pytest

from tests.helpers import (
    create_tiny_dataset,
    get_run,
    metric_keys,
    metric_written_at,
    submit_run,
    wait_for,
    wait_for_run,
)
from tests.integration.conftest import stored_metric_rows

pytestmark = pytest.mark.integration


def test_sigterm_checkpoints_requeues_and_the_next_worker_finishes_the_run(client, settings, start_worker):
    run = submit_run(client, create_tiny_dataset(client), stage1={"epochs": 12})
    first = start_worker()
    wait_for(lambda: get_run(client, run["id"])["epoch"] >= 2, 180, "two epochs of stage 1")
    first.process.send_signal(signal.SIGTERM)
    assert first.process.wait(timeout=60) == 0  # a clean exit, within about one epoch
    assert "requeued" in first.log()
    stopped = get_run(client, run["id"])
    assert stopped["status"] == "queued" and stopped["stage"] == 1
    before = metric_written_at(client, run["id"])
    # every epoch the first worker finished is recorded, and nothing else: at least the two waited for
    assert sorted(before) == [(1, e) for e in range(1, len(before) + 1)] and len(before) >= 2

    second = start_worker()
    final = wait_for_run(client, run["id"], ("succeeded",), 240)
    assert final["attempts"] == 2
    keys = [(1, e) for e in range(1, 13)] + [(2, 1), (2, 2)]
    assert metric_keys(client, run["id"]) == keys
    # none missing, none twice, no other run's
    assert stored_metric_rows(settings.database_url) == [(run["id"], *k) for k in keys]
    # the second worker resumed from the checkpoint: the first worker's epochs were not trained again
    after = metric_written_at(client, run["id"])
    assert all(after[key] == written for key, written in before.items())
    assert second.log().count("claimed run") == 1
