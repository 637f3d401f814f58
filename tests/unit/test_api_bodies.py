"""Request bodies: one pydantic model per body validates the JSON and the multipart path alike, and
the OpenAPI shows the same limits (no server: SQLite store, in-memory broker)."""

from __future__ import annotations

import io
import zipfile

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.store.migrate import upgrade_head
from service.store.settings import Settings

KEY = "unit-test-key"


@pytest.fixture
def client(tmp_path):
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'h2t.db'}", broker_url="memory://",
                        artifact_dir=tmp_path / "artifacts", api_keys=(KEY,))
    upgrade_head(settings.database_url)
    with TestClient(create_app(settings), headers={"X-API-Key": KEY}) as test_client:
        yield test_client


def _archive() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("train/a/x.png", b"not checked before the form fields")
    return buffer.getvalue()


@pytest.mark.parametrize("image_size", ["4", "513", "big"])
def test_a_multipart_upload_with_an_image_size_out_of_the_configs_range_is_refused(client, tmp_path, image_size):
    response = client.post("/v1/datasets", files={"archive": ("a.zip", _archive(), "application/zip")},
                           data={"image_size": image_size})
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    assert [e["loc"] for e in response.json()["errors"]] == [["body", "image_size"]]
    datasets = tmp_path / "artifacts" / "datasets"
    assert not datasets.exists() or not any(datasets.iterdir())  # nothing extracted, nothing left


def test_the_openapi_bodies_carry_the_limits_of_the_models(client):
    paths = client.get("/openapi.json").json()["paths"]
    upload = paths["/v1/datasets"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert (upload["properties"]["image_size"]["minimum"], upload["properties"]["image_size"]["maximum"]) == (8, 512)
    assert upload["required"] == ["archive"]
    predict = paths["/v1/models/{model_ref}/predict"]["post"]["requestBody"]["content"]
    for media in ("application/json", "multipart/form-data"):
        top_k = predict[media]["schema"]["properties"]["top_k"]
        assert (top_k["minimum"], top_k["maximum"]) == (1, 1000)


def test_a_hand_parsed_body_and_a_fastapi_parsed_body_give_the_same_422(client):
    by_hand = client.post("/v1/datasets", json={"builtin": "digits", "imbalance_factor": 2})  # parse_json
    by_fastapi = client.post("/v1/runs", json={"dataset_id": "x", "seed": -1})  # the endpoint's signature
    for response, field, error in ((by_hand, "imbalance_factor", "less_than_equal"),
                                   (by_fastapi, "seed", "greater_than_equal")):
        assert response.status_code == 422
        problem = response.json()
        assert problem["detail"] == "the request does not match the schema"
        assert [(e["loc"], e["type"]) for e in problem["errors"]] == [(["body", field], error)]
