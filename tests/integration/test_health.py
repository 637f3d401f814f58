from __future__ import annotations

import os
import re

import httpx
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.store.orm import RunStatus
from tests.helpers import create_tiny_dataset, metric_sample, submit_run
from tests.integration.conftest import api_server

pytestmark = pytest.mark.integration
RUN_STATUSES = tuple(RunStatus)  # each an h2t_runs label


def test_readyz_is_200_when_database_and_broker_answer(client):
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json()["checks"] == {"database": "ok", "broker": "ok"}


@pytest.mark.parametrize("broken", ["database_url", "broker_url"])
def test_readyz_is_503_problem_json_when_a_dependency_is_down(settings, broken):
    dead = {"database_url": "postgresql+psycopg://postgres@127.0.0.1:1/none", "broker_url": "redis://127.0.0.1:1/0"}
    app = create_app(settings.model_copy(update={broken: dead[broken]}))
    with TestClient(app) as test_client:
        response = test_client.get("/readyz")
        assert response.status_code == 503
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json()["status"] == 503  # the problem's numeric status, beside the checks
        checks = response.json()["checks"]
        assert checks[broken.split("_")[0]].startswith("error")
        assert test_client.get("/healthz").status_code == 200


def test_openapi_documents_the_api_and_its_key(client):
    spec = client.get("/openapi.json").json()
    assert {"/v1/datasets", "/v1/runs", "/v1/runs/{run_id}/metrics", "/v1/runs/{run_id}/cancel", "/readyz"} <= set(
        spec["paths"]
    )
    assert "X-API-Key" in str(spec["components"]["securitySchemes"])
    assert set(spec["paths"]["/v1/datasets"]["post"]["requestBody"]["content"]) == {
        "application/json",
        "multipart/form-data",
    }


def test_metrics_count_queued_runs_and_the_broker_queue_depth(client, settings):
    dataset = create_tiny_dataset(client)
    for _ in range(2):  # no worker is running: both wait in the broker
        submit_run(client, dataset)
    text = client.get("/metrics").text
    assert metric_sample(text, f'h2t_queue_depth{{queue="{settings.queue_name}"}}') == 2
    runs = {status: metric_sample(text, f'h2t_runs{{status="{status}"}}') for status in RUN_STATUSES}
    assert runs == {status: 2 if status == "queued" else 0 for status in RUN_STATUSES}
    assert metric_sample(text, "h2t_epochs_trained_total") == 0 and metric_sample(text, "h2t_models") == 0
    assert metric_sample(text, "h2t_store_up") == 1


def test_the_dashboard_and_the_docs_load_nothing_from_elsewhere(client):
    assert client.get("/", follow_redirects=False).headers["location"] == "/ui/"
    page = client.get("/ui/")
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    docs = client.get("/docs")
    assert docs.status_code == 200 and "connect-src 'self'" in docs.headers["content-security-policy"]
    for html in (page.text, docs.text):
        assert "http://" not in html and "https://" not in html
        for asset in re.findall(r'(?:src|href)="(/[^"]+)"', html):
            assert client.get(asset).status_code == 200, asset


def test_the_api_runs_in_several_processes_on_one_port(settings, tmp_path):
    with api_server(settings, tmp_path / "api.log", H2T_API_PROCESSES="2") as base_url:
        with httpx.Client(base_url=base_url, headers={"X-API-Key": settings.api_keys[0]}) as http:
            for _ in range(20):  # new connections: the kernel spreads them over the processes
                assert httpx.get(f"{base_url}/healthz").status_code == 200
            dataset = http.post("/v1/datasets", json={"builtin": "digits", "imbalance_factor": 0.05})
            assert dataset.status_code == 201
            assert http.get(f"/v1/datasets/{dataset.json()['id']}").status_code == 200  # one store for all
        server = next(p for p in _children(os.getpid()) if b"serve" in _cmdline(p))
        assert len(_children(server)) >= 2, "uvicorn did not start two API processes"


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except OSError:
                continue
    return found


def _cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()
