"""A run naming a weights file outside the data root (absolute, `..`, a symbolic link out of it) or a
file that is not there is a 4xx problem+json at POST /v1/runs, and nothing is written; a real worker
starts stage 1 from the file, and checks it again when it reads it."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from models.core.backbones import build_classifier
from service.api.app import create_app
from service.store.db import session_scope
from service.store.orm import RunRow
from tests.helpers import create_tiny_dataset, tiny_run_config, wait_for_run
from tests.integration.conftest import API_KEY, spawn_worker

pytestmark = pytest.mark.integration


@pytest.fixture
def weights_settings(settings, tmp_path):
    return settings.model_copy(update={"data_root": tmp_path / "data-root"})


@pytest.fixture
def weights_client(weights_settings, tmp_path):
    root, outside = weights_settings.data_root, tmp_path / "outside"
    (root / "weights").mkdir(parents=True)
    outside.mkdir()
    state = build_classifier("resnet32", 10).state_dict()
    torch.save(state, root / "weights" / "r32.pt")
    torch.save(state, outside / "r32.pt")
    (root / "weights" / "link.pt").symlink_to(outside / "r32.pt")
    (root / "out").symlink_to(outside)
    (root / "weights" / "loop.pt").symlink_to(root / "weights" / "loop.pt")
    with TestClient(create_app(weights_settings), headers={"X-API-Key": API_KEY}) as client:
        yield client


def _post(client, dataset_id: str, weights: dict):
    return client.post("/v1/runs", json={"dataset_id": dataset_id, **tiny_run_config(pretrained=weights)})


@pytest.mark.parametrize("file", ["/etc/passwd.pt", "../outside/r32.pt", "weights/../../outside/r32.pt",
                                  "weights/link.pt", "out/r32.pt", "weights/none.pt", "weights/r32.txt",
                                  "weights/loop.pt", "w" * 300 + ".pt"])
def test_a_weights_file_outside_the_data_root_or_missing_is_refused_and_nothing_is_written(
        weights_client, settings, file):
    dataset_id = create_tiny_dataset(weights_client)
    response = _post(weights_client, dataset_id, {"file": file})
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert "pretrained" in response.text
    with session_scope(settings.database_url) as session:
        assert session.scalar(select(func.count()).select_from(RunRow)) == 0
    runs = settings.artifact_dir / "runs"
    assert not runs.exists() or not any(runs.iterdir())


def test_a_weights_file_inside_the_data_root_is_accepted(weights_client):
    dataset_id = create_tiny_dataset(weights_client)
    response = _post(weights_client, dataset_id, {"file": "weights/r32.pt", "head": "auto"})
    assert response.status_code == 202, response.text
    assert response.json()["config"]["pretrained"] == {"file": "weights/r32.pt", "head": "auto"}


def test_torchvision_weights_of_another_backbone_are_refused(weights_client):
    dataset_id = create_tiny_dataset(weights_client)
    response = _post(weights_client, dataset_id, {"torchvision": "ResNet50_Weights.IMAGENET1K_V2"})
    assert response.status_code == 422 and "resnet32" in response.text


def test_a_worker_starts_stage_1_from_the_file_and_checks_the_path_again(weights_client, weights_settings, tmp_path):
    dataset_id = create_tiny_dataset(weights_client)
    good = _post(weights_client, dataset_id, {"file": "weights/r32.pt", "head": "auto"}).json()
    # accepted, then replaced by a link out of the root before a worker reads it
    torch.save(build_classifier("resnet32", 10).state_dict(), weights_settings.data_root / "weights" / "later.pt")
    swapped = _post(weights_client, dataset_id, {"file": "weights/later.pt"}).json()
    (weights_settings.data_root / "weights" / "later.pt").unlink()
    (weights_settings.data_root / "weights" / "later.pt").symlink_to(tmp_path / "outside" / "r32.pt")
    worker = spawn_worker(weights_settings, tmp_path / "worker.log")
    try:
        assert wait_for_run(weights_client, good["id"])["status"] == "succeeded"
        failed = wait_for_run(weights_client, swapped["id"])
    finally:
        worker.stop()
    assert failed["status"] == "failed" and "leaves the data root" in failed["error"]
    assert "stage 1 starts from pretrained weights weights/r32.pt: " in worker.log()
