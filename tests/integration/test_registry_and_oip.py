"""The model registry (names, versions, aliases with who and when; predict by name, name@version and
name@alias; ETag on the ONNX download) and the Open Inference Protocol v2 endpoints driven by the real
`tritonclient[http]` package against a real `h2t serve`: metadata, readiness, and infer with JSON and binary
tensors, FP32 and UINT8, answering what our own predict endpoint answers."""

from __future__ import annotations

import io
import signal
import uuid

import httpx
import numpy as np
import pytest
from PIL import Image

from models.contract.config import BuiltinDataset
from models.contract.onnx_model import decode_image
from models.core.data import digits_long_tailed
from service.store.settings import Settings
from tests.conftest import SHARED_DATA
from tests.helpers import TINY_DATASET, submit_run, wait_for, wait_for_run
from tests.integration.conftest import API_KEY, api_server, spawn_worker

pytestmark = pytest.mark.integration
tritonclient_http = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")
KEY = {"X-API-Key": API_KEY}


@pytest.fixture(scope="module")
def served(databases, redis_url, tmp_path_factory):
    """Two models trained by a real worker, and `h2t serve` on a spare port: (base URL, model a, model b)."""
    folder = tmp_path_factory.mktemp("registry")
    settings = Settings(database_url=databases.migrated(), broker_url=redis_url, artifact_dir=folder / "artifacts",
                        data_root=SHARED_DATA, api_keys=(API_KEY,), queue_name=f"h2t-it-{uuid.uuid4().hex[:8]}")
    worker = spawn_worker(settings, folder / "worker.log")
    try:
        with api_server(settings, folder / "api.log") as base_url, \
                httpx.Client(base_url=base_url, headers=KEY, timeout=60) as http:
            dataset = http.post("/v1/datasets", json=TINY_DATASET).json()["id"]
            runs = [submit_run(http, dataset, seed=seed) for seed in (0, 1)]
            models = [wait_for_run(http, run["id"], ("succeeded",), 240)["model_id"] for run in runs]
            worker.stop(signal.SIGKILL)
            yield base_url, models[0], models[1]
    finally:
        worker.stop(signal.SIGKILL)
        databases.drop(settings.database_url)


@pytest.fixture
def http(served):
    with httpx.Client(base_url=served[0], headers=KEY, timeout=60) as client:
        yield client


def _test_pngs(count: int) -> tuple[list[bytes], np.ndarray]:
    """Held-out digits as PNG files, and the uint8 N x 3 x S x S batch the server decodes them to."""
    test = digits_long_tailed(BuiltinDataset(**TINY_DATASET)).test.images[:count].numpy()
    pngs = []
    for image in test:
        buffer = io.BytesIO()
        Image.fromarray(image.transpose(1, 2, 0)).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    size = test.shape[-1]
    decoded = np.stack([np.round(decode_image(png, size, 10**6) * 255).astype(np.uint8) for png in pngs])
    return pngs, decoded


def _predicted(http, ref: str, pngs: list[bytes]) -> dict:
    response = http.post(f"/v1/models/{ref}/predict", files=[("images", (f"{i}.png", png, "image/png"))
                                                             for i, png in enumerate(pngs)], data={"top_k": "1000"})
    assert response.status_code == 200, response.text
    return response.json()


def _probabilities(answer: dict) -> np.ndarray:
    rows = []
    for prediction in answer["predictions"]:
        row = np.zeros(len(prediction["top_k"]))
        for entry in prediction["top_k"]:
            row[entry["class_index"]] = entry["probability"]
        rows.append(row)
    return np.array(rows)


def test_versions_and_aliases_name_models_for_predict_and_moves_are_recorded(http, served):
    _, model_a, model_b = served
    created = http.post("/v1/registry", json={"name": "digits-clf", "description": "the tiny digits model"})
    assert created.status_code == 201 and created.headers["location"] == "/v1/registry/digits-clf"
    assert http.post("/v1/registry", json={"name": "digits-clf"}).status_code == 409
    assert http.post("/v1/registry", json={"name": "1-starts-with-a-digit"}).status_code == 422
    assert http.post("/v1/registry", json={"name": "has@at"}).status_code == 422
    for model in (model_a, model_b):
        assert http.post("/v1/registry/digits-clf/versions", json={"model_id": model}).status_code == 201
    assert http.post("/v1/registry/digits-clf/versions", json={"model_id": "no-such-model"}).status_code == 404

    moved = http.put("/v1/registry/digits-clf/aliases/production", json={"version": 1},
                     headers={"X-H2T-User": "alice"})
    assert moved.status_code == 200, moved.text
    registered = moved.json()
    assert registered["latest_version"] == 2
    assert [(v["version"], v["model_id"]) for v in registered["versions"]] == [(1, model_a), (2, model_b)]
    assert [(a["alias"], a["version"]) for a in registered["aliases"]] == [("production", 1)]
    event = registered["alias_history"][0]
    assert event["by"].startswith("alice (key ") and API_KEY not in event["by"] and event["version"] == 1

    pngs, _ = _test_pngs(3)
    by_id = {model: _predicted(http, model, pngs) for model in (model_a, model_b)}
    for ref, model in (("digits-clf", model_b), ("digits-clf@1", model_a), ("digits-clf@2", model_b),
                       ("digits-clf@production", model_a)):
        answer = _predicted(http, ref, pngs)
        assert answer["model_id"] == model, ref
        assert answer["predictions"] == by_id[model]["predictions"], ref
    assert http.get("/v1/models/digits-clf@production").json()["id"] == model_a
    assert http.get("/v1/models/digits-clf@production/calibration").json()["model_id"] == model_a

    # one call moves the alias; predict follows within the resolution cache's 2 s
    assert http.put("/v1/registry/digits-clf/aliases/production", json={"version": 2}).status_code == 200
    wait_for(lambda: _predicted(http, "digits-clf@production", pngs)["model_id"] == model_b, 10,
             "predict to follow the moved alias")
    history = http.get("/v1/registry/digits-clf").json()["alias_history"]
    assert [(e["alias"], e["version"]) for e in history] == [("production", 2), ("production", 1)]

    # what is in use is not deleted from under its users
    assert http.delete("/v1/registry/digits-clf/versions/2").status_code == 409  # production points at it
    assert http.delete(f"/v1/models/{model_a}").status_code == 409  # it is version 1
    assert "version 1 of 'digits-clf'" in http.delete(f"/v1/runs/{model_a}").json()["detail"]
    for missing in ("digits-clf@7", "digits-clf@staging", "no-such-name", "no-such-name@1"):
        assert http.post(f"/v1/models/{missing}/predict", files={"images": ("a.png", pngs[0])}).status_code == 404

    assert http.delete("/v1/registry/digits-clf/aliases/production").status_code == 204
    assert http.get("/v1/registry/digits-clf").json()["alias_history"][0]["version"] is None  # removal recorded
    assert http.delete("/v1/registry/digits-clf/versions/2").status_code == 204
    assert http.get("/v1/models/digits-clf").json()["id"] == model_a  # the latest is now version 1
    assert http.delete("/v1/registry/digits-clf").status_code == 204
    assert http.get(f"/v1/models/{model_a}").status_code == 200  # the models stay


def test_the_onnx_download_answers_304_to_a_matching_if_none_match(http, served):
    _, model_a, _ = served
    first = http.get(f"/v1/models/{model_a}/onnx")
    etag = first.headers["etag"]
    assert first.status_code == 200 and etag.strip('"') == http.get(f"/v1/models/{model_a}").json()["onnx_sha256"]
    again = http.get(f"/v1/models/{model_a}/onnx", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
    assert http.get(f"/v1/models/{model_a}/onnx", headers={"If-None-Match": f'W/"x", {etag}'}).status_code == 304
    assert http.get(f"/v1/models/{model_a}/onnx", headers={"If-None-Match": '"other"'}).status_code == 200


def test_tritonclient_reads_metadata_and_infers_with_json_and_binary_tensors(http, served):
    base_url, model_a, model_b = served
    http.post("/v1/registry", json={"name": "triton-digits"})
    for model in (model_a, model_b):
        http.post("/v1/registry/triton-digits/versions", json={"model_id": model})
    http.put("/v1/registry/triton-digits/aliases/production", json={"version": 1})
    triton = tritonclient_http.InferenceServerClient(url=base_url.removeprefix("http://"))
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.get_server_metadata()["name"] == "h2t"
    assert triton.is_model_ready("triton-digits", headers=KEY)
    assert triton.is_model_ready("triton-digits", "2", headers=KEY)
    metadata = triton.get_model_metadata("triton-digits", headers=KEY)
    assert metadata["versions"] == ["1", "2"] and metadata["platform"] == "onnxruntime_onnx"
    (image_input,) = metadata["inputs"]
    size = image_input["shape"][-1]
    assert image_input == {"name": "image", "datatype": "FP32", "shape": [-1, 3, size, size]}
    assert {o["name"] for o in metadata["outputs"]} == {"probabilities", "predicted_class", "predicted_group",
                                                         "group_accuracy", "group_ece"}

    pngs, uint8_batch = _test_pngs(4)
    expected = {model: _predicted(http, model, pngs) for model in (model_a, model_b)}

    def infer(model_name: str, batch: np.ndarray, datatype: str, binary: bool, version: str = "") -> object:
        tensor = tritonclient_http.InferInput("image", list(batch.shape), datatype)
        tensor.set_data_from_numpy(batch, binary_data=binary)
        outputs = [tritonclient_http.InferRequestedOutput(name, binary_data=binary)
                   for name in ("probabilities", "predicted_class", "predicted_group", "group_accuracy")]
        # a fresh dict: tritonclient writes Inference-Header-Content-Length into the headers it is given
        return triton.infer(model_name, [tensor], model_version=version, outputs=outputs, headers=dict(KEY))

    float_batch = uint8_batch.astype(np.float32) / np.float32(255)
    cases = (("triton-digits", "", model_b, "2"), ("triton-digits", "1", model_a, "1"),
             ("triton-digits", "production", model_a, "1"), (model_a, "", model_a, "1"))
    for name, version, model, served_version in cases:
        for datatype, batch in (("FP32", float_batch), ("UINT8", uint8_batch)):
            for binary in (False, True):
                result = infer(name, batch, datatype, binary, version)
                assert result.get_response()["model_version"] == served_version
                probabilities = result.as_numpy("probabilities")
                assert probabilities.shape == (4, 10) and probabilities.dtype == np.float32
                np.testing.assert_allclose(probabilities, _probabilities(expected[model]), atol=1e-6)
                predicted = [p["predicted"] for p in expected[model]["predictions"]]
                assert result.as_numpy("predicted_class").tolist() == [p["class_index"] for p in predicted]
                groups = [g.decode() if isinstance(g, bytes) else g for g in result.as_numpy("predicted_group")]
                assert groups == [p["group"] for p in predicted]
                np.testing.assert_allclose(result.as_numpy("group_accuracy"),
                                           [p["group_calibration"]["accuracy"] for p in predicted], rtol=1e-6)

    # refusals come back as the client's exception, with our message
    with pytest.raises(tritonclient_http.InferenceServerException, match=r"shape \[N, 3"):
        infer("triton-digits", np.ascontiguousarray(float_batch[:, :, :4, :4]), "FP32", True)
    keyless = tritonclient_http.InferInput("image", [1, 3, size, size], "FP32")
    keyless.set_data_from_numpy(float_batch[:1])
    with pytest.raises(tritonclient_http.InferenceServerException, match="X-API-Key"):
        triton.infer("triton-digits", [keyless])
    with pytest.raises(tritonclient_http.InferenceServerException, match="no version 9"):
        infer("triton-digits", float_batch, "FP32", False, "9")
