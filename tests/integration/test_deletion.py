"""Cleaning up: runs, models and datasets are deleted with their files; what others still depend on, or what
still trains, is a 409 unless force cascades (or the run is cancelled first)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.store.db import session_scope
from service.store.orm import MetricRow, RunRow, RunStatus
from tests.helpers import create_tiny_dataset, submit_run, wait_for_run

pytestmark = pytest.mark.integration


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _predict(client, model_id: str) -> int:
    return client.post(f"/v1/models/{model_id}/predict", files=[("images", ("a.png", _png(), "image/png"))]).status_code


def _mark_succeeded(settings, run_id: str) -> None:
    with session_scope(settings.database_url) as session:  # as if it had trained
        session.get(RunRow, run_id).status = RunStatus.succeeded


def test_a_trained_run_is_deleted_with_its_metrics_model_and_files(client, settings, start_worker):
    dataset_id = create_tiny_dataset(client)
    run_id = submit_run(client, dataset_id, stage1={"epochs": 1, "warmup_epochs": 0}, stage2={"epochs": 1})["id"]
    start_worker()
    wait_for_run(client, run_id, {"succeeded"})
    folder = settings.artifacts.run(run_id).root
    assert folder.exists() and _predict(client, run_id) == 200  # the model is loaded and cached now
    reusing = submit_run(client, dataset_id, stage1_from=run_id)["id"]
    refused = client.delete(f"/v1/runs/{run_id}")
    assert refused.status_code == 409 and "reuse the stage 1" in refused.json()["detail"]
    # the run reusing it is queued or already training: force cascades only to finished runs
    assert "cancel it first" in client.delete(f"/v1/runs/{run_id}", params={"force": "true"}).text
    assert client.post(f"/v1/runs/{reusing}/cancel", params={"force": "true"}).json()["status"] == "cancelled"

    assert client.delete(f"/v1/runs/{run_id}", params={"force": "true"}).status_code == 204
    for gone in (f"/v1/runs/{run_id}", f"/v1/runs/{reusing}", f"/v1/models/{run_id}"):
        assert client.get(gone).status_code == 404
    assert _predict(client, run_id) == 404  # not served from the cache either
    assert not folder.exists()
    with session_scope(settings.database_url) as session:
        assert session.query(MetricRow).filter_by(run_id=run_id).count() == 0


def test_a_model_is_deleted_and_its_run_stays(client, settings, start_worker):
    run_id = submit_run(client, create_tiny_dataset(client), stage1={"epochs": 1, "warmup_epochs": 0},
                        stage2={"epochs": 1})["id"]
    start_worker()
    wait_for_run(client, run_id, {"succeeded"})
    onnx = settings.artifacts.run(run_id).onnx
    assert onnx.exists() and _predict(client, run_id) == 200
    assert client.delete(f"/v1/models/{run_id}").status_code == 204
    assert client.get(f"/v1/models/{run_id}").status_code == 404 and _predict(client, run_id) == 404
    run = client.get(f"/v1/runs/{run_id}").json()
    assert run["status"] == "succeeded" and run["model_id"] is None and not onnx.exists()
    assert settings.artifacts.run(run_id).checkpoint(2).exists()  # the run's checkpoints stay
    assert client.delete(f"/v1/models/{run_id}").status_code == 404


def test_a_dataset_in_use_is_kept_unless_forced_and_never_while_a_run_is_queued(client, settings):
    dataset_id = create_tiny_dataset(client)
    finished = submit_run(client, dataset_id)["id"]
    _mark_succeeded(settings, finished)
    refused = client.delete(f"/v1/datasets/{dataset_id}")
    assert refused.status_code == 409 and "used by 1 run(s)" in refused.json()["detail"]
    queued = submit_run(client, dataset_id)["id"]
    assert client.delete(f"/v1/datasets/{dataset_id}", params={"force": "true"}).status_code == 409
    assert client.get(f"/v1/runs/{finished}").status_code == 200  # nothing was half-deleted
    assert client.post(f"/v1/runs/{queued}/cancel").json()["status"] == "cancelled"
    assert client.delete(f"/v1/datasets/{dataset_id}", params={"force": "true"}).status_code == 204
    for gone in (f"/v1/datasets/{dataset_id}", f"/v1/runs/{finished}", f"/v1/runs/{queued}"):
        assert client.get(gone).status_code == 404
