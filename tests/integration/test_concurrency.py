"""The API as it is deployed (`h2t serve`: uvicorn in its own process, on PostgreSQL and Redis) under
concurrent clients: every write is visible to the next request, and predicts against more models than
the serving cache holds all answer while models are evicted under them."""

from __future__ import annotations

import io
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.helpers import TINY_DATASET, submit_run, tiny_run_config, wait_for_run
from tests.integration.conftest import API_KEY, api_server, spawn_worker

pytestmark = pytest.mark.integration


def _client(base_url: str) -> httpx.Client:
    return httpx.Client(base_url=base_url, headers={"X-API-Key": API_KEY}, timeout=30)


def _status(response: httpx.Response) -> str | None:
    return response.json().get("status") if response.status_code == 200 else None


CLIENTS, ROUNDS = 8, 9  # each round is three write-then-read pairs: 8 x 9 x 3 = 216 pairs


def test_a_get_right_after_every_201_or_202_sees_the_write_under_concurrent_clients(settings, tmp_path):
    """Eight clients at once create datasets, submit runs and cancel them against the real server; each
    write is followed at once by a GET of what it wrote, which must see it: no 404, the status the write
    answered (a cancelled run never reads queued)."""

    def rounds(_: int) -> list[tuple[str, str, int, str | None]]:
        seen = []  # (what, id, status code of the GET, what the GET read where the write answered a status)
        with _client(base_url) as api:
            for _ in range(ROUNDS):
                created = api.post("/v1/datasets", json=TINY_DATASET)
                assert created.status_code == 201, created.text
                dataset_id = created.json()["id"]
                read = api.get(f"/v1/datasets/{dataset_id}")
                seen.append(("dataset", dataset_id, read.status_code, None))

                submitted = api.post("/v1/runs", json={"dataset_id": dataset_id, **tiny_run_config()})
                assert submitted.status_code == 202, submitted.text
                run_id = submitted.json()["id"]
                read = api.get(f"/v1/runs/{run_id}")
                seen.append(("run", run_id, read.status_code, f"{submitted.json()['status']} -> {_status(read)}"))

                cancelled = api.post(f"/v1/runs/{run_id}/cancel")
                assert cancelled.status_code == 202, cancelled.text
                read = api.get(f"/v1/runs/{run_id}")
                seen.append(("cancel", run_id, read.status_code, f"{cancelled.json()['status']} -> {_status(read)}"))
        return seen

    with api_server(settings, tmp_path / "api.log") as base_url:
        started = time.monotonic()
        with ThreadPoolExecutor(CLIENTS) as pool:
            seen = [pair for client in pool.map(rounds, range(CLIENTS)) for pair in client]
        elapsed = time.monotonic() - started
        with _client(base_url) as api:
            runs = api.get("/v1/runs", params={"limit": 500}).json()
    print(f"\n{len(seen)} write-then-read pairs from {CLIENTS} clients in {elapsed:.1f} s")

    assert len(seen) == CLIENTS * ROUNDS * 3
    assert [pair for pair in seen if pair[2] != 200] == []
    assert {status for what, *_, status in seen if what == "run"} == {"queued -> queued"}
    assert {status for what, *_, status in seen if what == "cancel"} == {"cancelled -> cancelled"}
    assert runs["count"] == CLIENTS * ROUNDS and {r["status"] for r in runs["data"]} == {"cancelled"}


def _png(rng: np.random.Generator, size: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


MODELS, CACHE_SIZE, PREDICTORS, PREDICTS_EACH = 5, 1, 8, 15


def test_predicts_against_more_models_than_the_cache_holds_all_answer_while_models_are_evicted(settings, tmp_path):
    """Five models trained by a real worker, served by a server that keeps one loaded: eight clients send
    predicts that cycle through all five, so nearly every request loads a model and evicts one that other
    requests are using or are queued on in its batcher. Every request answers 200 within its 30 s timeout,
    with the answer of the model it named (the probabilities that model gives to a lone request)."""
    worker = spawn_worker(settings, tmp_path / "worker.log")
    try:
        # a batch waits up to 50 ms for more requests, so evictions find requests queued in the batcher
        with api_server(settings, tmp_path / "api.log", H2T_MODEL_CACHE_SIZE=str(CACHE_SIZE),
                         H2T_PREDICT_MAX_WAIT_MS="50") as base_url:
            with _client(base_url) as api:
                dataset = api.post("/v1/datasets", json=TINY_DATASET).json()["id"]
                first = submit_run(api, dataset)["id"]
                try:
                    wait_for_run(api, first, ("succeeded",), 240)
                    # the others re-train only a one-epoch stage 2 on the first one's backbone, each with its own seed
                    others = [submit_run(api, dataset, stage1_from=first, seed=seed, stage2={"epochs": 1})["id"]
                              for seed in range(1, MODELS)]
                    models = [wait_for_run(api, run_id, ("succeeded",), 240)["model_id"] for run_id in [first, *others]]
                except AssertionError as exc:
                    raise AssertionError(f"{exc}\n{worker.log()[-3000:]}") from None
            worker.stop(signal.SIGKILL)  # serving only from here on

            rng = np.random.default_rng(0)
            images = [_png(rng, 8) for _ in range(4)]

            def predict(api: httpx.Client, model_id: str, count: int) -> tuple[float, httpx.Response]:
                files = [("images", (f"{i}.png", images[i])) for i in range(count)]
                started = time.monotonic()
                response = api.post(f"/v1/models/{model_id}/predict", files=files, data={"top_k": "10"})
                return time.monotonic() - started, response

            def probabilities(response: httpx.Response) -> np.ndarray:
                rows = []
                for prediction in response.json()["predictions"]:
                    row = np.zeros(10)
                    for top in prediction["top_k"]:
                        row[top["class_index"]] = top["probability"]
                    rows.append(row)
                return np.array(rows)

            with _client(base_url) as api:  # what each model answers to a lone request (loading one at a time)
                expected = {}
                for model_id in models:
                    _, response = predict(api, model_id, len(images))
                    assert response.status_code == 200, response.text
                    expected[model_id] = probabilities(response)
            assert len({e.round(6).tobytes() for e in expected.values()}) == MODELS  # five distinct models

            def client(index: int) -> list[tuple[str, int, float, int, np.ndarray | None]]:
                answers = []
                with _client(base_url) as api:
                    for i in range(PREDICTS_EACH):
                        model_id, count = models[(index + i) % MODELS], 1 + (index + i) % len(images)
                        try:
                            seconds, response = predict(api, model_id, count)
                        except httpx.TimeoutException:
                            answers.append((model_id, count, 30.0, 0, None))
                            continue
                        answers.append((model_id, count, seconds, response.status_code,
                                        probabilities(response) if response.status_code == 200 else None))
                return answers

            started = time.monotonic()
            with ThreadPoolExecutor(PREDICTORS) as pool:
                answers = [a for client_answers in pool.map(client, range(PREDICTORS)) for a in client_answers]
            elapsed = time.monotonic() - started
    finally:
        worker.stop(signal.SIGKILL)
    latencies = sorted(seconds for _, _, seconds, _, _ in answers)
    print(f"\n{len(answers)} predicts from {PREDICTORS} clients over {MODELS} models, cache of {CACHE_SIZE}, in "
          f"{elapsed:.1f} s; latency median {latencies[len(latencies) // 2]:.2f} s, max {latencies[-1]:.2f} s")

    assert [(m, code) for m, _, _, code, _ in answers if code != 200] == []
    assert len(answers) == PREDICTORS * PREDICTS_EACH
    wrong = [m for m, count, _, _, probs in answers if not np.allclose(probs, expected[m][:count], atol=1e-5)]
    assert wrong == []
