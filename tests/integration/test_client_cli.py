"""The client commands (`h2t datasets|runs|models|predict`) against a real `h2t serve` and `h2t worker`:
exit codes a script can trust, --json that parses, a watched run that ends with its per-group table."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.helpers import TINY_DATASET, tiny_run_config, wait_for
from tests.integration.conftest import API_KEY, REPO, api_server

pytestmark = pytest.mark.integration


def _h2t(base_url: str, *args: str, key: str = API_KEY) -> subprocess.CompletedProcess:
    env = {**os.environ, "H2T_URL": base_url, "H2T_API_KEY": key}
    return subprocess.run([sys.executable, "-m", "h2t", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


def test_the_client_commands_drive_a_run_from_submission_to_prediction(settings, start_worker, tmp_path):
    start_worker(H2T_WORKER_DEVICES="2")  # two CPU processes for the failing two-device run at the end
    with api_server(settings, tmp_path / "api.log") as base_url:
        created = _h2t(base_url, "datasets", "create", json.dumps(TINY_DATASET), "--json")
        assert created.returncode == 0, created.stderr
        dataset_id = json.loads(created.stdout)["id"]
        config = tmp_path / "run.yaml"
        config.write_text(yaml.safe_dump({"dataset": TINY_DATASET, **tiny_run_config()}))

        watched = _h2t(base_url, "runs", "submit", str(config), "--dataset", dataset_id, "--name", "first",
                       "--tag", "cli", "--watch")
        assert watched.returncode == 0, watched.stderr
        lines = watched.stdout.splitlines()
        assert "stage 2 epoch   2/2" in watched.stdout and "succeeded" in watched.stdout
        assert lines[-4].startswith("overall") and lines[-1].startswith("few")  # the per-group table

        listed = json.loads(_h2t(base_url, "runs", "list", "--tag", "cli", "--json").stdout)
        assert listed["count"] == 1 and listed["data"][0]["name"] == "first"
        run_id = listed["data"][0]["id"]
        logs = _h2t(base_url, "runs", "logs", run_id)
        assert logs.returncode == 0 and f"run {run_id} succeeded" in logs.stdout

        image = tmp_path / "digit.png"
        Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(image)
        predicted = _h2t(base_url, "predict", run_id, str(image), "--json")
        assert predicted.returncode == 0 and len(json.loads(predicted.stdout)["predictions"]) == 1
        onnx = tmp_path / "model.onnx"
        assert _h2t(base_url, "models", "download", run_id, "-o", str(onnx)).returncode == 0
        assert onnx.read_bytes()[:2] and onnx.stat().st_size > 10_000

        # a watched run that is cancelled: exit 1, and why
        config.write_text(yaml.safe_dump(tiny_run_config(stage1={"epochs": 200})))
        env = {**os.environ, "H2T_URL": base_url, "H2T_API_KEY": API_KEY}
        watcher = subprocess.Popen([sys.executable, "-m", "h2t", "runs", "submit", str(config), "--dataset", dataset_id,
                                    "--name", "long", "--watch"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)

        def running() -> str | None:
            runs = json.loads(_h2t(base_url, "runs", "list", "--name", "long", "--status", "running",
                                   "--json").stdout)["data"]
            return runs[0]["id"] if runs else None

        long_id = wait_for(running, 120, "the long run to start")
        assert _h2t(base_url, "runs", "cancel", long_id, "--force").returncode == 0
        out, err = watcher.communicate(timeout=60)
        assert watcher.returncode == 1 and f"run {long_id} ended cancelled" in err

        # a watched run that fails (SyncBatchNorm needs CUDA; these ranks are CPU processes): exit 1, and why
        config.write_text(yaml.safe_dump(tiny_run_config(devices=2, sync_batchnorm=True)))
        failed = _h2t(base_url, "runs", "submit", str(config), "--dataset", dataset_id, "--watch")
        assert failed.returncode == 1, failed.stdout
        assert "ended failed" in failed.stderr and "sync_batchnorm" in failed.stderr


def test_exit_codes_say_what_went_wrong(settings, tmp_path):
    with api_server(settings, tmp_path / "api.log") as base_url:
        wrong_key = _h2t(base_url, "runs", "list", key="not-the-key")
        assert wrong_key.returncode == 3 and "the API key was refused" in wrong_key.stderr
        missing = _h2t(base_url, "runs", "show", "no-such-run")
        assert missing.returncode == 4 and "not found" in missing.stderr
        refused = _h2t(base_url, "runs", "list", "--sort", "loss")
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1
        unreachable = _h2t("http://127.0.0.1:9", "runs", "list")
        assert unreachable.returncode == 5 and "cannot reach" in unreachable.stderr
        assert json.loads(_h2t(base_url, "runs", "list", "--json").stdout) == {"data": [], "count": 0}


def test_a_sweep_trains_one_stage1_and_starts_each_stage2_from_it_before_it_ends(settings, start_worker, tmp_path):
    start_worker()
    start_worker()  # a second worker takes the stage-2 runs while the first still trains the stage-1 run's stage 2
    with api_server(settings, tmp_path / "api.log") as base_url:
        dataset_id = json.loads(_h2t(base_url, "datasets", "create", json.dumps(TINY_DATASET), "--json").stdout)["id"]
        config = tmp_path / "run.yaml"
        config.write_text(yaml.safe_dump(tiny_run_config(stage2={"epochs": 25})))
        swept = _h2t(base_url, "sweep", str(config), "--dataset", dataset_id, "--rho", "0", "0.5", "--seed", "0", "1",
                     "--tag", "sweep-a", "--watch", "--json")
        assert swept.returncode == 0, swept.stderr
        result = json.loads(swept.stdout)
        rows = {(row["rho"], row["seed"]) for row in result["runs"]}
        assert rows == {(0.25, 0), (0.0, 0), (0.0, 1), (0.5, 0), (0.5, 1)}  # the stage-1 run's own, then the sweep's
        runs = json.loads(_h2t(base_url, "runs", "list", "--tag", "sweep-a", "--json").stdout)["data"]
        stage1 = [r for r in runs if r["stage1_from"] is None]
        assert [r["id"] for r in stage1] == [result["stage1"]] and len(runs) == 5
        finished_at = stage1[0]["finished_at"]
        assert all(r["stage1_from"] == result["stage1"] and r["created_at"] < finished_at for r in runs
                   if r["stage1_from"] is not None)  # submitted while the stage-1 run was still in its stage 2
        assert all(r["status"] == "succeeded" for r in runs)
