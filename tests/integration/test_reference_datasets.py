"""Datasets by reference over REST, with a real worker: each format (ImageFolder, list files, COCO JSON)
of the real-JPEG test dataset (tests/reference_data.py) registers with 202, is scanned to `ready` with its
counts and the corrupt file listed, and a tiny run on it trains to succeeded. Paths that leave the data
root are refused with nothing written; a scan whose message is lost is sent again by the sweep."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import redis

from models.contract.onnx_model import load_session, read_rgb, run_probabilities, uint8_to_input
from service.store.settings import Settings
from tests.helpers import create_tiny_dataset, submit_run, wait_for, wait_for_run
from tests.reference_data import CORRUPT, ReferenceTree

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(settings: Settings, reference_root: tuple[Path, ReferenceTree]) -> Settings:
    """The integration settings with the reference test dataset's data root."""
    return settings.model_copy(update={"data_root": reference_root[0]})


def _wait_scanned(client, dataset_id: str) -> dict:
    def scanned() -> dict | None:
        body = client.get(f"/v1/datasets/{dataset_id}").json()
        return body if body["status"] != "scanning" else None

    return wait_for(scanned, 120, f"the scan of dataset {dataset_id}")


@pytest.mark.parametrize("form", ["folder_spec", "list_files_spec", "coco_spec"])
def test_each_reference_format_registers_scans_ready_and_trains_to_succeeded(client, reference_root, start_worker,
                                                                             form):
    _, tree = reference_root
    response = client.post("/v1/datasets", json=getattr(tree, form))
    assert response.status_code == 202, response.text
    created = response.json()
    assert created["status"] == "scanning" and created["class_names"] == [] and created["image_size"] == 32
    assert response.headers["Location"] == f"/v1/datasets/{created['id']}"

    rejected = client.post("/v1/runs", json={"dataset_id": created["id"]})
    assert rejected.status_code == 409 and "scanning" in rejected.json()["detail"]

    start_worker()
    dataset = _wait_scanned(client, created["id"])
    assert dataset["status"] == "ready", dataset["error"]
    assert dict(zip(dataset["class_names"], dataset["train_counts"], strict=True)) == dict(
        zip(tree.class_names, tree.train_counts, strict=True))
    assert dataset["test_counts"] == [3] * len(tree.class_names) and dataset["num_classes"] == len(tree.class_names)
    assert [u["path"] for u in dataset["unreadable"]] == [f"{tree.folder}/{CORRUPT}"]
    assert dataset["unreadable_count"] == 1
    assert set(dataset["groups"]) <= {"many", "medium", "few"} and len(dataset["groups"]) == len(tree.class_names)

    run = submit_run(client, created["id"])
    finished = wait_for_run(client, run["id"], {"succeeded"})
    assert finished["model_id"] == run["id"]


def test_a_run_streaming_from_files_trains_and_serves_with_the_centre_crop_it_evaluated_with(
        client, reference_root, start_worker, tmp_path):
    root, tree = reference_root
    created = client.post("/v1/datasets", json={"folder": tree.folder, "image_size": 48}).json()
    start_worker()
    assert _wait_scanned(client, created["id"])["status"] == "ready"
    run = submit_run(client, created["id"], augment={"crop": "resized", "horizontal_flip": True},
                     loader={"mode": "streaming", "workers": 2})
    assert run["config"]["loader"]["mode"] == "streaming"
    finished = wait_for_run(client, run["id"], {"succeeded"})
    model = client.get(f"/v1/models/{finished['model_id']}").json()
    assert model["input"]["fit"] == "center_crop" and model["input"]["height"] == 48

    # serving decodes a request exactly as evaluation read the test split: the same probabilities
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(client.get(f"/v1/models/{model['id']}/onnx").content)
    test_image = next((root / tree.folder / "test").glob("*/*.jpg"))
    expected = run_probabilities(load_session(onnx), uint8_to_input(
        read_rgb(test_image, 48, fit="center_crop")[None]))
    response = client.post(f"/v1/models/{model['id']}/predict", json={
        "images": [base64.b64encode(test_image.read_bytes()).decode()], "top_k": 1})
    assert response.status_code == 200, response.text
    top = response.json()["predictions"][0]["top_k"][0]
    assert top["class_index"] == int(expected[0].argmax())
    assert top["probability"] == pytest.approx(float(expected[0].max()), abs=1e-6)


def test_streaming_a_dataset_that_has_no_files_is_refused(client):
    dataset_id = create_tiny_dataset(client)
    response = client.post("/v1/runs", json={"dataset_id": dataset_id, "loader": {"mode": "streaming"}})
    assert response.status_code == 422, response.text
    assert "only a dataset by reference" in response.json()["detail"]
    assert client.get("/v1/runs").json()["count"] == 0


@pytest.mark.parametrize("spec", [
    {"folder": "/etc"},
    {"folder": "lt/../../outside"},
    {"list_files": {"root": "lt", "train": "../../outside/lists/train.txt", "test": "lists/test.txt"}},
    {"folder": "escape"},  # a symbolic link to a folder outside the root
    {"coco": {"root": "escape", "train": "coco/train.json", "test": "coco/test.json"}},
])
def test_paths_leaving_the_data_root_are_refused_with_nothing_written(client, spec):
    response = client.post("/v1/datasets", json=spec)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert client.get("/v1/datasets").json()["count"] == 0


def test_a_reference_that_cannot_be_read_fails_its_scan_with_why_and_takes_no_run(client, start_worker):
    response = client.post("/v1/datasets", json={"folder": "missing", "name": "nothing here"})
    assert response.status_code == 202, response.text
    start_worker()
    dataset = _wait_scanned(client, response.json()["id"])
    assert dataset["status"] == "failed" and "missing/train" in dataset["error"]
    rejected = client.post("/v1/runs", json={"dataset_id": dataset["id"]})
    assert rejected.status_code == 409 and "failed" in rejected.json()["detail"]


def test_a_scan_whose_message_was_lost_is_sent_again_by_the_sweep(client, settings, reference_root):
    _, tree = reference_root
    response = client.post("/v1/datasets", json=tree.folder_spec)
    assert response.status_code == 202, response.text
    queue = redis.Redis.from_url(settings.broker_url)
    assert queue.delete(settings.queue_name) == 1  # the broker lost the message (a restart without persistence)

    resend_soon = settings.model_copy(update={"resend_after_s": 1.0})
    from tests.integration.conftest import spawn_worker

    worker = spawn_worker(resend_soon, Path(settings.artifact_dir).parent / "resend-worker.log")
    try:
        dataset = _wait_scanned(client, response.json()["id"])
    finally:
        worker.stop()
    assert dataset["status"] == "ready", dataset["error"]
    assert "sent the scan of dataset" in worker.log()


def test_a_scan_fails_a_dataset_whose_group_slices_miss_its_classes(client, reference_root, start_worker):
    _, tree = reference_root
    slices = [[0, 1], [1, 2], [2, len(tree.class_names) + 5]]
    created = client.post("/v1/datasets", json={**tree.folder_spec, "groups": {"slices": slices}}).json()
    start_worker()
    dataset = _wait_scanned(client, created["id"])
    assert dataset["status"] == "failed"
    assert f"must end at the dataset's {len(tree.class_names)} classes" in dataset["error"]
