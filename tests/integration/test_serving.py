"""The exported model through the real API: registration, calibration, predict, bad input."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import signal
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from models.contract.config import BuiltinDataset
from models.contract.onnx_model import decode_image, evaluate_onnx, load_session, run_probabilities
from models.core.data import digits_long_tailed
from service.api.app import create_app
from service.store.settings import Settings
from tests.conftest import SHARED_DATA
from tests.helpers import TINY_DATASET, create_tiny_dataset, submit_run, wait_for_run
from tests.integration.conftest import API_KEY, spawn_worker

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def digits():
    return digits_long_tailed(BuiltinDataset(**TINY_DATASET))  # the dataset the served run trained on


@pytest.fixture(scope="module")
def served(databases, redis_url, tmp_path_factory):
    """One run trained by a real worker on this module's own database; yields its settings, its model
    id and the id of a second run, cancelled while queued."""
    settings = Settings(
        database_url=databases.migrated(),
        broker_url=redis_url,
        artifact_dir=tmp_path_factory.mktemp("serving") / "artifacts",
        data_root=SHARED_DATA,
        api_keys=(API_KEY,),
        queue_name=f"h2t-it-{uuid.uuid4().hex[:8]}",
        predict_max_images=16,
        max_image_pixels=256 * 256,
        predict_max_image_bytes=200_000,
    )
    worker = spawn_worker(settings, tmp_path_factory.mktemp("logs") / "worker.log")
    try:
        with TestClient(create_app(settings), headers={"X-API-Key": API_KEY}) as client:
            dataset = create_tiny_dataset(client)
            # calibrated on a validation split: the served model applies temperatures, the tests below hold for it
            run = submit_run(client, dataset, stage1={"epochs": 4}, validation={"calibration": "group"})
            try:
                final = wait_for_run(client, run["id"], ("succeeded",), 240)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{worker.log()[-2000:]}") from None
            worker.stop(signal.SIGKILL)  # no worker may take the second run: it must still be queued when cancelled
            queued = submit_run(client, dataset, stage1={"epochs": 4})
            assert client.post(f"/v1/runs/{queued['id']}/cancel").json()["status"] == "cancelled"
        yield settings, final["model_id"], queued["id"]
    finally:
        worker.stop(signal.SIGKILL)
        databases.drop(settings.database_url)


@pytest.fixture
def api(served):
    settings, _, _ = served
    with TestClient(create_app(settings), headers={"X-API-Key": API_KEY}) as client:
        yield client


def _png(image_chw: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image_chw.transpose(1, 2, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def _downloaded_session(api, model_id, tmp_path):
    response = api.get(f"/v1/models/{model_id}/onnx")
    assert response.status_code == 200
    path = tmp_path / "model.onnx"
    path.write_bytes(response.content)
    return load_session(path), response


def test_a_succeeded_run_registers_its_model_with_parity_and_sha256(api, served, tmp_path):
    _, model_id, _ = served
    model = api.get(f"/v1/models/{model_id}").json()
    assert model["run_id"] == model_id and model["num_classes"] == 10
    assert model["parity"]["max_abs_diff"] < 1e-4 and model["parity"]["images"] == 256
    assert model["input"]["height"] == 16 and model["input"]["range"] == [0.0, 1.0]
    assert set(model["calibration"]) == {"overall", "many", "medium", "few"}
    _, response = _downloaded_session(api, model_id, tmp_path)
    assert hashlib.sha256(response.content).hexdigest() == model["onnx_sha256"]
    assert [m["id"] for m in api.get("/v1/models").json()["data"]] == [model_id]  # not the cancelled run
    fit = api.get(f"/v1/models/{model_id}/calibration").json()["calibration_fit"]
    assert fit["level"] == "group" and fit["validation_images"] > 0 and "left out" in fit["validation"]
    assert set(fit["temperatures"]) == {"overall", "many", "medium", "few"}
    assert fit["test_before"]["overall"]["accuracy"] == pytest.approx(model["calibration"]["overall"]["accuracy"])
    session, _ = _downloaded_session(api, model_id, tmp_path)
    assert len(json.loads(session.get_modelmeta().custom_metadata_map["h2t.temperatures"])) == 10


def test_stored_calibration_equals_an_independent_recomputation_from_the_onnx_outputs(api, served, digits, tmp_path):
    _, model_id, _ = served
    session, _ = _downloaded_session(api, model_id, tmp_path)
    model = api.get(f"/v1/models/{model_id}").json()
    independent = evaluate_onnx(session, digits.test.images.numpy(), digits.test.labels.numpy(), model["groups"])
    stored = api.get(f"/v1/models/{model_id}/calibration").json()
    assert stored["top1"] == pytest.approx(independent.top1)
    for name, group in independent.model_dump()["groups"].items():
        assert stored["groups"][name]["n"] == group["n"]
        assert stored["groups"][name]["accuracy"] == pytest.approx(group["accuracy"])
        assert stored["groups"][name]["ece"] == pytest.approx(group["ece"])
        assert [b["count"] for b in stored["groups"][name]["bins"]] == [b["count"] for b in group["bins"]]


def test_predict_answers_match_the_onnx_model_run_directly(api, served, digits, tmp_path):
    _, model_id, _ = served
    session, _ = _downloaded_session(api, model_id, tmp_path)
    model = api.get(f"/v1/models/{model_id}").json()
    pngs = [_png(digits.test.images[i].numpy()) for i in range(0, 300, 25)]
    response = api.post(
        f"/v1/models/{model_id}/predict",
        files=[("images", (f"{i}.png", p, "image/png")) for i, p in enumerate(pngs)],
        data={"top_k": "3"},
    )
    assert response.status_code == 200, response.text
    expected = run_probabilities(session, np.stack([decode_image(p, 16, 10**6) for p in pngs]))
    for i, prediction in enumerate(response.json()["predictions"]):
        order = np.argsort(-expected[i], kind="stable")[:3]
        assert [c["class_index"] for c in prediction["top_k"]] == order.tolist()
        assert [c["probability"] for c in prediction["top_k"]] == pytest.approx(expected[i][order].tolist(), abs=1e-7)
        best = prediction["predicted"]
        assert best["group"] == model["groups"][best["class_index"]]
        assert best["group_calibration"] == pytest.approx(model["calibration"][best["group"]])
    as_json = api.post(
        f"/v1/models/{model_id}/predict", json={"images": [base64.b64encode(p).decode() for p in pngs], "top_k": 3}
    )
    assert as_json.json() == response.json()
    timed = 'h2t_http_request_duration_seconds_count{method="POST",route="/v1/models/{model_ref}/predict",status="200"}'
    assert f"{timed} 2.0" in api.get("/metrics").text  # timed by its route's template, never its raw path


def test_batched_and_unbatched_answers_are_identical(served, digits):
    settings, model_id, _ = served
    pngs = [_png(digits.test.images[i].numpy()) for i in range(0, 300, 10)]

    def answers(batching: bool) -> list[dict]:
        app = create_app(settings.model_copy(update={"predict_batching": batching, "predict_max_wait_ms": 20}))
        with TestClient(app, headers={"X-API-Key": API_KEY}) as client, ThreadPoolExecutor(8) as pool:

            def one(png: bytes) -> dict:
                response = client.post(f"/v1/models/{model_id}/predict", files={"images": ("x.png", png)})
                assert response.status_code == 200, response.text
                return response.json()["predictions"][0]

            return list(pool.map(one, pngs))

    assert answers(batching=True) == answers(batching=False)


@pytest.mark.parametrize(
    "case, status, detail",
    [
        ("not an image", 422, "not a readable image"),
        ("truncated", 422, "not a readable image"),
        ("huge dimensions", 422, "pixel limit"),
        ("too many images", 413, "at most 16"),
        ("image too many bytes", 413, "larger than"),
        ("bad base64", 422, "base64"),
        ("no images", 422, ""),
        ("top_k 0", 422, ""),
        ("wrong content type", 415, "multipart"),
        ("unknown model", 404, "not found"),
        ("unfinished model", 409, "no exported model"),
        ("no API key", 401, "X-API-Key"),
    ],
)
def test_hostile_predict_requests_get_a_problem_json_4xx(api, served, digits, case, status, detail):
    _, model_id, queued_id = served
    good = _png(digits.test.images[0].numpy())
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)).save(big, "PNG")
    url = f"/v1/models/{model_id}/predict"
    send = {
        "not an image": lambda: api.post(url, files={"images": ("a.png", b"hello")}),
        "truncated": lambda: api.post(url, files={"images": ("a.png", good[:50])}),
        "huge dimensions": lambda: api.post(url, files={"images": ("a.png", _png(np.zeros((3, 300, 300), np.uint8)))}),
        "too many images": lambda: api.post(url, files=[("images", (f"{i}.png", good)) for i in range(17)]),
        "image too many bytes": lambda: api.post(url, files={"images": ("a.png", big.getvalue())}),
        "bad base64": lambda: api.post(url, json={"images": ["%%%not base64%%%"]}),
        "no images": lambda: api.post(url, json={"images": []}),
        "top_k 0": lambda: api.post(url, json={"images": [base64.b64encode(good).decode()], "top_k": 0}),
        "wrong content type": lambda: api.post(url, content=good, headers={"content-type": "image/png"}),
        "unknown model": lambda: api.post("/v1/models/nope/predict", files={"images": ("a.png", good)}),
        "unfinished model": lambda: api.post(f"/v1/models/{queued_id}/predict", files={"images": ("a.png", good)}),
        "no API key": lambda: api.post(url, files={"images": ("a.png", good)}, headers={"X-API-Key": ""}),
    }[case]
    response = send()
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert detail in response.json()["detail"]
    assert api.post(url, files={"images": ("a.png", good)}).status_code == 200  # still serving
