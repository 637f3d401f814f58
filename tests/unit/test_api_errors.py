"""Errors outside the domain still answer problem+json: the store unreachable is a 503 with
Retry-After, a wrong method a 405 with Allow (no servers: the store is a closed port or SQLite)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.store.migrate import upgrade_head
from service.store.settings import Settings

KEY = "unit-test-key"


def _client(database_url: str, tmp_path) -> TestClient:
    settings = Settings(database_url=database_url, broker_url="memory://", artifact_dir=tmp_path / "artifacts",
                        api_keys=(KEY,))
    return TestClient(create_app(settings), headers={"X-API-Key": KEY})


@pytest.mark.parametrize("method, path", [("GET", "/v1/runs"), ("GET", "/v1/datasets/x"), ("POST", "/v1/runs/x/cancel"),
                                          ("GET", "/v1/models")])
def test_an_unreachable_store_is_a_503_problem_with_retry_after(tmp_path, method, path):
    with _client("postgresql+psycopg://postgres@127.0.0.1:1/none?connect_timeout=2", tmp_path) as client:
        response = client.request(method, path)
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["retry-after"] == "5"
    assert response.json()["detail"] == "the database is unreachable; try again shortly"


@pytest.mark.parametrize("method, path, allowed", [("DELETE", "/v1/runs", "GET, POST"),
                                                   ("PUT", "/v1/datasets/x", "DELETE, GET"),
                                                   ("OPTIONS", "/v1/models/x/predict", "POST")])
def test_a_wrong_method_is_a_405_problem_that_says_what_is_allowed(tmp_path, method, path, allowed):
    url = f"sqlite:///{tmp_path / 'h2t.db'}"
    upgrade_head(url)
    with _client(url, tmp_path) as client:
        response = client.request(method, path)
    assert response.status_code == 405
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["allow"] == allowed  # every method of the path, not only those of one route


def test_a_write_is_committed_before_its_response_starts(tmp_path):
    """A client that reads right after a 201 or 202 must see the write: check the store at the very
    moment the response starts, from another connection."""
    import sqlalchemy as sa

    url = f"sqlite:///{tmp_path / 'h2t.db'}"
    upgrade_head(url)
    observer = sa.create_engine(url)
    seen: list[tuple[str, int, list]] = []
    settings = Settings(database_url=url, broker_url="memory://", artifact_dir=tmp_path / "artifacts", api_keys=(KEY,))
    app = create_app(settings)

    async def observed(scope, receive, send):
        async def watching_send(message):
            if message["type"] == "http.response.start" and scope["method"] == "POST":
                with observer.connect() as connection:
                    datasets = connection.execute(sa.text("SELECT count(*) FROM datasets")).scalar()
                    statuses = [r[0] for r in connection.execute(sa.text("SELECT status FROM runs"))]
                seen.append((scope["path"], datasets, statuses))
            await send(message)
        await app(scope, receive, watching_send)

    with TestClient(observed, headers={"X-API-Key": KEY}) as client:
        dataset = client.post("/v1/datasets", json={"builtin": "digits"}).json()["id"]
        run = client.post("/v1/runs", json={"dataset_id": dataset}).json()["id"]
        assert client.post(f"/v1/runs/{run}/cancel").status_code == 202
    assert seen == [("/v1/datasets", 1, []), ("/v1/runs", 1, ["queued"]), (f"/v1/runs/{run}/cancel", 1, ["cancelled"])]


@pytest.mark.parametrize("path, content_type, size, status", [
    ("/v1/runs", "application/json", 200_000, 413),
    ("/v1/datasets", "application/json", 200_000, 413),
    ("/v1/datasets", "multipart/form-data; boundary=x", 200_000, 400),  # archives may be large: read, malformed
])
def test_bodies_are_bounded_per_route(tmp_path, path, content_type, size, status):
    url = f"sqlite:///{tmp_path / 'h2t.db'}"
    upgrade_head(url)
    with _client(url, tmp_path) as client:
        response = client.post(path, content=b"{" + b" " * size + b"}", headers={"content-type": content_type})
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    if status == 413:
        assert response.json()["detail"] == "the request body exceeds 65536 bytes"
