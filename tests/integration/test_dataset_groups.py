"""One group definition per dataset: stored when the dataset is created (the paper's index slices for builtin
CIFAR-100, count thresholds otherwise, or the creator's), shown with the dataset, and used by every run on
it; a run asking for other groups is refused with nothing written."""

from __future__ import annotations

import json

import pytest

from tests.helpers import TINY_DATASET, tiny_run_config
from tests.integration.test_bad_input import good_files, make_zip, upload

pytestmark = pytest.mark.integration

PAPER_SLICES = [[0, 36], [36, 71], [71, 100]]


def _run_count(client) -> int:
    return client.get("/v1/runs").json()["count"]


def test_builtin_cifar100_groups_by_the_papers_slices_and_its_runs_use_them(client, cifar_root):
    created = client.post("/v1/datasets", json={"builtin": "cifar100", "imbalance_factor": 0.01})
    assert created.status_code == 201, created.text
    dataset = created.json()
    assert dataset["group_definition"]["slices"] == PAPER_SLICES
    assert [dataset["groups"].count(g) for g in ("many", "medium", "few")] == [36, 35, 29]

    run = client.post("/v1/runs", json={"dataset_id": dataset["id"]})
    assert run.status_code == 202, run.text
    assert run.json()["config"]["groups"]["slices"] == PAPER_SLICES

    refused = client.post("/v1/runs", json={"dataset_id": dataset["id"], "groups": {"many_threshold": 50}})
    assert refused.status_code == 422 and "its group definition" in refused.json()["detail"]
    same = client.post("/v1/runs", json={"dataset_id": dataset["id"], "groups": {"slices": PAPER_SLICES}})
    assert same.status_code == 202, same.text  # restating the dataset's own definition is fine
    assert _run_count(client) == 2


def test_a_dataset_keeps_the_thresholds_its_creator_gave(client):
    created = client.post("/v1/datasets", json={**TINY_DATASET, "groups": {"many_threshold": 60, "few_threshold": 10}})
    assert created.status_code == 201, created.text
    dataset = created.json()
    assert dataset["group_definition"] == {"many_threshold": 60, "few_threshold": 10, "slices": None}
    expected = ["many" if n > 60 else "few" if n < 10 else "medium" for n in dataset["train_counts"]]
    assert dataset["groups"] == expected and "few" in expected
    assert client.get(f"/v1/datasets/{dataset['id']}").json()["groups"] == expected
    run = client.post("/v1/runs", json={"dataset_id": dataset["id"], **tiny_run_config()}).json()
    assert run["config"]["groups"] == dataset["group_definition"]


def test_an_uploaded_archive_takes_its_definition_as_json_text(client):
    response = upload(client, make_zip(good_files()), groups=json.dumps({"many_threshold": 2, "few_threshold": 1}))
    assert response.status_code == 201, response.text
    assert response.json()["groups"] == ["many", "many"]


@pytest.mark.parametrize("body", [
    {**TINY_DATASET, "groups": {"slices": [[0, 3], [3, 6], [6, 12]]}},   # digits has 10 classes
    {**TINY_DATASET, "groups": {"few_threshold": 50, "many_threshold": 10}},
])
def test_a_definition_that_does_not_fit_is_refused_with_nothing_written(client, body):
    response = client.post("/v1/datasets", json=body)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert client.get("/v1/datasets").json()["count"] == 0


def test_an_archive_with_slices_past_its_classes_is_refused_and_leaves_no_files(client, settings):
    response = upload(client, make_zip(good_files()), groups=json.dumps({"slices": [[0, 1], [1, 2], [2, 3]]}))
    assert response.status_code == 422 and "2 classes" in response.json()["detail"]
    assert client.get("/v1/datasets").json()["count"] == 0
    assert not any((settings.artifact_dir / "datasets").glob("*"))
