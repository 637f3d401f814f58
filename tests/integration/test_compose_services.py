"""The exact commands and environment of the compose file's migrate, api and worker services, run
on this machine outside Docker, pointed at the local PostgreSQL and Redis: a REST-submitted run
completes through them, and /metrics shows the counters moving."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import SHARED_DATA
from tests.helpers import create_tiny_dataset, metric_sample, submit_run, wait_for, wait_for_run
from tests.unit.test_deploy_files import resolved_compose

pytestmark = pytest.mark.integration
COMPOSE_API_PORT = "8000"  # as the api service's command says; run here on a spare port instead


def _executable(name: str) -> str:
    beside_python = Path(sys.executable).parent / name
    return str(beside_python) if beside_python.exists() else shutil.which(name) or name


def _local_env(service: dict, database_url: str, redis_url: str, tmp_path: Path) -> dict[str, str]:
    """The service's own environment, with compose's hosts and volumes mapped to this machine."""
    env = {k: str(v) for k, v in service["environment"].items()}
    assert env["H2T_DATABASE_URL"].endswith("@postgres:5432/h2t") and env["H2T_BROKER_URL"] == "redis://redis:6379/0"
    env["H2T_DATABASE_URL"] = database_url
    env["H2T_BROKER_URL"] = redis_url
    env["H2T_ARTIFACT_DIR"] = str(tmp_path / env["H2T_ARTIFACT_DIR"].lstrip("/"))  # the shared volume
    env["H2T_DATA_ROOT"] = str(SHARED_DATA)
    return {
        **os.environ,
        **env,
        "H2T_QUEUE_NAME": f"h2t-it-{uuid.uuid4().hex[:8]}",
        "OMP_NUM_THREADS": "1",
        "H2T_SWEEP_INTERVAL_S": "2",
        "H2T_HEARTBEAT_INTERVAL_S": "1",
        "H2T_HEARTBEAT_TIMEOUT_S": "10",
    }


def _spare_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _on_port(command: list[str], port: int) -> list[str]:
    """The api command with its --port value swapped, so a server already on 8000 here does not matter."""
    at = command.index("--port")
    assert command[at + 1] == COMPOSE_API_PORT, command
    return [*command[:at + 1], str(port), *command[at + 2:]]


def test_compose_commands_run_outside_docker_complete_a_run_and_move_the_metrics(make_database, redis_url, tmp_path):
    api_port = _spare_port()
    services = resolved_compose(["docker-compose.yml"])["services"]
    database_url = make_database()  # empty: the migrate service creates the schema
    queue_env = None
    processes: list[subprocess.Popen] = []
    try:
        envs = {}
        for name in ("migrate", "api", "worker"):
            envs[name] = _local_env(services[name], database_url, redis_url, tmp_path)
        queue_env = envs["migrate"]["H2T_QUEUE_NAME"]
        for env in envs.values():
            env["H2T_QUEUE_NAME"] = queue_env
        (tmp_path / "data" / "artifacts").mkdir(parents=True)

        command = services["migrate"]["command"]
        subprocess.run(
            [_executable(command[0]), *command[1:]], env=envs["migrate"], cwd=tmp_path, check=True, timeout=120
        )
        for name in ("api", "worker"):
            command = services[name]["command"]
            command = _on_port(command, api_port) if name == "api" else command
            log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
            processes.append(
                subprocess.Popen(
                    [_executable(command[0]), *command[1:]],
                    env=envs[name],
                    cwd=tmp_path,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        key = envs["api"]["H2T_API_KEYS"].split(",")[0]
        with httpx.Client(base_url=f"http://127.0.0.1:{api_port}", headers={"X-API-Key": key}, timeout=30) as api:
            wait_for(lambda: _ready(api), 90, "the api service's /readyz")
            before = api.get("/metrics").text

            run = submit_run(api, create_tiny_dataset(api))
            try:
                wait_for_run(api, run["id"], ("succeeded",), 240)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{(tmp_path / 'worker.log').read_text()[-2000:]}") from None
            after_run = api.get("/metrics").text

            buffer = io.BytesIO()
            Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(buffer, "PNG")
            answer = api.post(
                f"/v1/models/{run['id']}/predict",
                files=[("images", ("a.png", buffer.getvalue())), ("images", ("b.png", buffer.getvalue()))],
            )
            assert answer.status_code == 200, answer.text
            after_predict = api.get("/metrics").text

        # the database is this test's own and the api process is fresh: every count starts at 0
        counters = ("h2t_epochs_trained_total", 'h2t_runs{status="succeeded"}', "h2t_models")
        assert [metric_sample(before, name) for name in counters] == [0, 0, 0]
        assert [metric_sample(after_run, name) for name in counters] == [5, 1, 1]  # 3 + 2 epochs, one model
        assert metric_sample(after_run, f'h2t_queue_depth{{queue="{queue_env}"}}') == 0
        route = 'h2t_http_request_duration_seconds_count{method="POST",route="/v1/runs",status="202"}'
        assert route not in before and metric_sample(after_run, route) == 1
        assert metric_sample(after_run, "h2t_predicted_images_total") == 0
        assert metric_sample(after_predict, "h2t_predicted_images_total") == 2
        # the request's two images went through onnxruntime together, in one call
        assert metric_sample(after_predict, "h2t_predict_batch_size_count") == 1
        assert metric_sample(after_predict, "h2t_predict_batch_size_sum") == 2
        predict_route = 'route="/v1/models/{model_ref}/predict",status="200"'
        assert predict_route in after_predict
        # structured logs with run ids
        worker_log = (tmp_path / "worker.log").read_text()
        assert f'"run_id": "{run["id"]}"' in worker_log and '"level": "INFO"' in worker_log
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def _ready(api: httpx.Client) -> bool:
    try:
        return api.get("/readyz").status_code == 200
    except httpx.TransportError:
        time.sleep(0.3)
        return False
