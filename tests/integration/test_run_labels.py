"""Runs a user can find again: names and tags at submission or later, lists filtered and sorted, and a
misspelt filter refused rather than ignored."""

from __future__ import annotations

import pytest

from service.store.db import session_scope
from service.store.orm import RunRow, RunStatus
from tests.helpers import create_tiny_dataset, submit_run

pytestmark = pytest.mark.integration


def _names(client, **params) -> list[str]:
    response = client.get("/v1/runs", params=params)
    assert response.status_code == 200, response.text
    return [run["name"] for run in response.json()["data"]]


def test_runs_are_named_tagged_filtered_and_sorted(client, settings):
    digits, other = create_tiny_dataset(client), create_tiny_dataset(client)
    base = submit_run(client, digits, name="stage 1", tags=["sweep-7", "base"])
    assert (base["name"], base["tags"]) == ("stage 1", ["base", "sweep-7"])
    with session_scope(settings.database_url) as session:  # as if it had trained
        session.get(RunRow, base["id"]).status = RunStatus.succeeded
    for rho in (0.25, 0.5):
        submit_run(client, digits, name=f"rho={rho}", tags=["sweep-7", f"rho={rho}", "sweep-7"],
                   stage1_from=base["id"], stage2={"rho": rho})
    submit_run(client, digits, name="crt", tags=["sweep-7"], stage1_from=base["id"],
               stage2={"method": "crt", "rho": 0})
    submit_run(client, other, name="elsewhere")

    assert _names(client) == ["elsewhere", "crt", "rho=0.5", "rho=0.25", "stage 1"]  # newest first
    assert _names(client, dataset_id=other) == ["elsewhere"]
    assert _names(client, tag="sweep-7", stage1_from=base["id"]) == ["crt", "rho=0.5", "rho=0.25"]
    assert _names(client, tag=["sweep-7", "rho=0.5"]) == ["rho=0.5"]  # every tag must match
    assert _names(client, method="crt") == ["crt"]
    assert _names(client, status="succeeded") == ["stage 1"]
    assert _names(client, name="rho=0.25") == ["rho=0.25"]
    assert _names(client, search="RHO") == ["rho=0.5", "rho=0.25"]  # within the name, any case
    assert _names(client, search="%") == []  # a wildcard character is only itself
    assert _names(client, sort="name") == ["crt", "elsewhere", "rho=0.25", "rho=0.5", "stage 1"]
    assert _names(client, sort="-name", limit=2) == ["stage 1", "rho=0.5"]
    assert client.get("/v1/runs", params={"tag": "sweep-7"}).json()["count"] == 4
    assert client.get("/v1/runs", params={"tag": "rho=0.25"}).json()["data"][0]["tags"] == ["rho=0.25", "sweep-7"]


def test_a_run_is_renamed_and_retagged(client):
    run = submit_run(client, create_tiny_dataset(client), name="first try")
    renamed = client.patch(f"/v1/runs/{run['id']}", json={"tags": ["keep", "best"]})
    assert renamed.status_code == 200 and (renamed.json()["name"], renamed.json()["tags"]) == ("first try",
                                                                                               ["best", "keep"])
    cleared = client.patch(f"/v1/runs/{run['id']}", json={"name": None, "tags": []}).json()
    assert (cleared["name"], cleared["tags"]) == (None, [])
    assert client.patch("/v1/runs/no-such-run", json={"name": "x"}).status_code == 404


@pytest.mark.parametrize("params, status, says", [
    ({"staus": "queued"}, 400, "unknown query parameter(s): staus"),
    ({"sort": "loss"}, 422, "sort"),
    ({"method": "dr"}, 422, "method"),
])
def test_a_misspelt_filter_or_sort_is_refused_not_ignored(client, params, status, says):
    response = client.get("/v1/runs", params=params)
    assert response.status_code == status and response.headers["content-type"] == "application/problem+json"
    assert says in response.text


@pytest.mark.parametrize("labels, field", [
    ({"name": ""}, "name"), ({"name": "x" * 201}, "name"), ({"tags": ["has space"]}, "tags"),
    ({"tags": ["-leading"]}, "tags"), ({"tags": [f"t{i}" for i in range(21)]}, "tags"),
])
def test_bad_names_and_tags_are_refused_and_nothing_is_written(client, labels, field):
    dataset_id = create_tiny_dataset(client)
    response = client.post("/v1/runs", json={"dataset_id": dataset_id, **labels})
    assert response.status_code == 422 and field in response.text
    assert client.get("/v1/runs").json()["count"] == 0


def test_a_run_reusing_a_reused_stage1_records_the_run_that_trained_it(client, settings):
    dataset_id = create_tiny_dataset(client)
    trained = submit_run(client, dataset_id)["id"]
    with session_scope(settings.database_url) as session:  # as if both had trained
        session.get(RunRow, trained).status = RunStatus.succeeded
    second = submit_run(client, dataset_id, stage1_from=trained)["id"]
    with session_scope(settings.database_url) as session:
        session.get(RunRow, second).status = RunStatus.succeeded
    third = submit_run(client, dataset_id, stage1_from=second)
    assert third["stage1_from"] == trained  # where the stage-1 checkpoint is
