"""Schema fuzzing: schemathesis builds requests from the service's own OpenAPI (valid ones, and invalid
ones derived from the same schema) and sends them to the running API over HTTP. Every answer must be
declared: no 5xx, only documented status codes and content types, bodies and headers that match their
schema, and 405 with an `Allow` that lists the path's methods for a method it does not have.

The server is the real app under uvicorn on a loopback port, on this test's migrated PostgreSQL
database and Redis queue. Before fuzzing, a worker trains one tiny model and stops, so the requests reach
real resources: path ids, `dataset_id` and `stage1_from` are drawn mostly from the ids that exist (a
dataset, the model's run, a queued run), sometimes freely. Runs created while fuzzing stay queued.
Both request bodies of the upload endpoints are fuzzed: JSON, and multipart forms with generated files
(which never make a valid archive or image: the hostile-input tests send those).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import hypothesis
import pytest
import schemathesis
import uvicorn
from fastapi.testclient import TestClient
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from service.api.app import create_app
from service.store.settings import Settings
from tests.helpers import create_tiny_dataset, submit_run, wait_for_run
from tests.integration.conftest import API_KEY

pytestmark = pytest.mark.integration

MAX_EXAMPLES = 200  # generated examples per operation, beside schemathesis's systematic coverage cases
SEED = 9  # with derandomize, every run sends the same requests
KNOWN_ID_PROBABILITY = 0.8  # how often an id is one that exists rather than a generated one

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    unsupported_method,
    allow_header_conformance,
]


@pytest.fixture
def existing(settings: Settings, start_worker) -> dict[str, str]:
    """A dataset, a run whose model a worker trained and exported, and a run left queued."""
    with TestClient(create_app(settings), headers={"X-API-Key": API_KEY}) as client:
        dataset = create_tiny_dataset(client)
        worker = start_worker()
        trained = submit_run(client, dataset, stage1={"epochs": 1, "warmup_epochs": 0}, stage2={"epochs": 1})["id"]
        try:
            wait_for_run(client, trained, ("succeeded",), 240)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{worker.log()[-2000:]}") from None
        worker.stop()  # nothing trains the runs the fuzzing creates
        queued = submit_run(client, dataset)["id"]
    return {"dataset": dataset, "model": trained, "queued_run": queued}


@pytest.fixture
def base_url(settings: Settings, existing: dict[str, str]) -> Iterator[str]:
    """The app served by uvicorn on a free loopback port, for the length of the test."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=30)
    sock.close()


@pytest.fixture
def api_schema(base_url: str, existing: dict[str, str]) -> schemathesis.BaseSchema:
    runs = [existing["model"], existing["queued_run"]]

    def known(dictionary: str) -> dict[str, object]:
        return {"dictionary": dictionary, "probability": KNOWN_ID_PROBABILITY}

    config = SchemathesisConfig.from_dict({
        "seed": SEED,
        "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none",
                       "with-security-parameters": False},
        "auth": {"openapi": {"APIKeyHeader": {"api_key": API_KEY}}},
        "dictionaries": {"datasets": {"values": [existing["dataset"]]}, "runs": {"values": runs},
                         "models": {"values": [existing["model"]]}},
        "parameters": {"path.dataset_id": known("datasets"), "body.dataset_id": known("datasets"),
                       "path.run_id": known("runs"), "body.stage1_from": known("runs"),
                       "path.model_id": known("models")},
    })
    return schemathesis.openapi.from_url(f"{base_url}/openapi.json", config=config)


# a run's live streams stay open until the run ends, and the queued run never does: their answers are checked
# by tests/integration/test_run_events.py instead
schema = schemathesis.pytest.from_fixture("api_schema").exclude(path_regex=r"/v1/runs/\{run_id\}/(events|logs)$")


@schema.parametrize()
@hypothesis.settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None)
def test_every_generated_request_gets_a_declared_answer(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=CHECKS)
