"""`h2t demo`: the whole system on the embedded defaults, on one machine with no servers installed.

Starts the API and one worker (SQLite store, SQLite broker, artifacts on local disk, all in a
scratch folder), creates the embedded long-tailed digits over REST, submits a run, follows its
progress, prints the per-group report from the stored metrics and stops everything.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from models.contract.config import AugmentConfig, BuiltinDataset, LocalTrainConfig, Stage1Config, Stage2Config
from models.contract.layout import RunFolder
from models.contract.metrics import EpochMetrics
from models.contract.reporting import epoch_line, group_rows_table, pct
from service.store.orm import TERMINAL, RunStatus

# scikit-learn's real 8x8 handwritten digits (shipped in its wheel), made long-tailed: 144 down to 7
# training images per class, 30 balanced test images per class. Trains in well under a minute on a CPU.
DEMO_CONFIG = LocalTrainConfig(
    dataset=BuiltinDataset(builtin="digits", imbalance_factor=0.05),
    augment=AugmentConfig(horizontal_flip=False),  # a mirrored digit is not the same digit
    stage1=Stage1Config(epochs=20, batch_size=32, lr=0.02, weight_decay=5e-4, schedule="cosine",
                        warmup_epochs=2, mixup_alpha=0.0),
    stage2=Stage2Config(method="h2t", rho=0.25, epochs=10, batch_size=32, lr=0.02, weight_decay=5e-4),
)


def demo_config(stage1_epochs: int | None = None, stage2_epochs: int | None = None) -> LocalTrainConfig:
    stage1 = DEMO_CONFIG.stage1.model_copy(update={"epochs": stage1_epochs} if stage1_epochs else {})
    if stage1.warmup_epochs > stage1.epochs:
        stage1 = stage1.model_copy(update={"warmup_epochs": stage1.epochs})
    stage2 = DEMO_CONFIG.stage2.model_copy(update={"epochs": stage2_epochs} if stage2_epochs else {})
    return DEMO_CONFIG.model_copy(update={"stage1": stage1, "stage2": stage2})


def run_local_demo(folder: RunFolder | None = None, stage1_epochs: int | None = None,
                   stage2_epochs: int | None = None) -> int:
    """The same training in this process, without the service; in a scratch folder unless one is given.
    SIGTERM ends it like Ctrl-C (the scratch folder is removed on the way out)."""
    from models.contract.reporting import group_table
    from models.core.data import load_dataset
    from models.core.train import resolve_device, train_two_stage

    config = demo_config(stage1_epochs, stage2_epochs)
    dataset = load_dataset(config.dataset)
    device = resolve_device()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # unwinds like Ctrl-C: the scratch folder goes
    print(f"demo: {dataset.name}, {len(dataset.train)} long-tailed training images "
          f"(per class {dataset.train_counts()}), {len(dataset.test)} test images, device {device}", flush=True)
    with tempfile.TemporaryDirectory(prefix="h2t-demo-") as tmp:
        result = train_two_stage(dataset, config, folder or RunFolder(Path(tmp)), device,
                                 on_epoch=lambda m: print(epoch_line(m), flush=True))
    print()
    print(group_table(result.report, dataset.train_counts(), dataset.test_counts(), result.groups))
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(process: subprocess.Popen, name: str) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            print(f"{name} did not stop in 20 s; killing it", flush=True)
            process.kill()
            process.wait()


def _wait_ready(client: httpx.Client, processes: dict[str, subprocess.Popen], timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for name, process in processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"the {name} exited with code {process.returncode}")
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the API was not ready within {timeout_s:.0f} s")


def _check(response: httpx.Response) -> dict:
    if response.is_error:
        raise RuntimeError(f"{response.request.method} {response.request.url.path} -> {response.status_code}: "
                           f"{response.text}")
    return response.json()


def report_table(dataset: dict, last: dict) -> str:
    """Per-group table of a stored metrics row, with class and image counts from the dataset."""
    return group_rows_table(dataset["groups"], dataset["train_counts"], dataset["test_counts"], {
        "overall": (last["top1"], last["ece"]), "many": (last["many"], last["ece_many"]),
        "medium": (last["medium"], last["ece_medium"]), "few": (last["few"], last["ece_few"])})


def run_service_demo(stage1_epochs: int | None = None, stage2_epochs: int | None = None,
                     home: Path | None = None) -> int:
    config = demo_config(stage1_epochs, stage2_epochs)
    with tempfile.TemporaryDirectory(prefix="h2t-demo-") as tmp:
        home = home or Path(tmp)
        key = secrets.token_urlsafe(16)
        env = {
            **os.environ,
            "H2T_HOME": str(home),  # the store, the broker and the artifacts all live under it
            "H2T_API_KEYS": key,
            "PYTHONUNBUFFERED": "1",
        }
        subprocess.run([sys.executable, "-m", "h2t", "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)
        port = _free_port()
        logs = {name: open(home / f"{name}.log", "w") for name in ("api", "worker")}  # noqa: SIM115
        processes = {
            "api": subprocess.Popen([sys.executable, "-m", "h2t", "serve", "--port", str(port)], env=env,
                                    stdout=logs["api"], stderr=subprocess.STDOUT),
            "worker": subprocess.Popen([sys.executable, "-m", "h2t", "worker"], env=env,
                                       stdout=logs["worker"], stderr=subprocess.STDOUT),
        }
        print(f"demo: API on http://127.0.0.1:{port} and one worker; SQLite store, SQLite broker, "
              f"artifacts in {home}", flush=True)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": key}, timeout=30) as client:
                _wait_ready(client, processes)
                return _drive(client, config, processes)
        except Exception as exc:
            print(f"demo failed: {exc}\n(logs: {home}/api.log, {home}/worker.log)", file=sys.stderr)
            for name in logs:
                print(f"--- last lines of {name}.log ---", file=sys.stderr)
                logs[name].flush()
                print("\n".join((home / f"{name}.log").read_text().splitlines()[-15:]), file=sys.stderr)
            return 1
        finally:
            for name, process in processes.items():
                _stop(process, name)
            for log in logs.values():
                log.close()


def _drive(client: httpx.Client, config: LocalTrainConfig, processes: dict[str, subprocess.Popen]) -> int:
    dataset = _check(client.post("/v1/datasets", json=config.dataset.model_dump(mode="json")))
    print(f"POST /v1/datasets -> {dataset['id']}: {dataset['name']}, train counts {dataset['train_counts']}")
    body = {"dataset_id": dataset["id"], **config.model_dump(mode="json", exclude={"dataset"})}
    run = _check(client.post("/v1/runs", json=body))
    print(f"POST /v1/runs -> {run['id']}: {run['status']}", flush=True)
    shown: set[tuple[int, int]] = set()
    status = run["status"]
    while True:
        run = _check(client.get(f"/v1/runs/{run['id']}"))
        for row in _check(client.get(f"/v1/runs/{run['id']}/metrics"))["data"]:
            if (row["stage"], row["epoch"]) not in shown:
                shown.add((row["stage"], row["epoch"]))
                # a stored row is the trainer's record plus when it was written
                print(epoch_line(EpochMetrics.model_validate(row)), flush=True)
        if run["status"] != status:
            status = run["status"]
            print(f"run is {status}", flush=True)
        if status in TERMINAL:
            break
        if processes["worker"].poll() is not None:
            raise RuntimeError("the worker exited")
        time.sleep(0.5)
    if status != RunStatus.succeeded:
        raise RuntimeError(f"run {status}: {run['error']}")
    metrics = _check(client.get(f"/v1/runs/{run['id']}/metrics"))["data"]
    stage1_last = [m for m in metrics if m["stage"] == 1][-1]
    stage2_last = metrics[-1]
    print(f"\nstage 1 (CE) last epoch: top-1 {100 * stage1_last['top1']:.2f}%, "
          f"few-shot {pct(stage1_last['few'])}%")
    print(f"stage 2 (H2T, rho {config.stage2.rho}) last epoch: top-1 {100 * stage2_last['top1']:.2f}%, "
          f"few-shot {pct(stage2_last['few'])}%\n")
    print("last epoch of stage 2 on the held-out test split, from the stored metrics:")
    print(report_table(dataset, stage2_last))
    _predict_and_report(client, run["id"], config)
    return 0


def _held_out_pngs(config: LocalTrainConfig, per_class: int = 1) -> list[tuple[int, bytes]]:
    """A few test images of the embedded digits (never trained on), as PNG files."""
    import io

    from PIL import Image

    from models.core.data import load_dataset

    test = load_dataset(config.dataset).test
    picked = []
    for cls in range(10):
        for i in (test.labels == cls).nonzero().flatten()[:per_class].tolist():
            buffer = io.BytesIO()
            Image.fromarray(test.images[i].permute(1, 2, 0).numpy()).save(buffer, format="PNG")
            picked.append((cls, buffer.getvalue()))
    return picked


def _predict_and_report(client: httpx.Client, model_id: str, config: LocalTrainConfig) -> None:
    model = _check(client.get(f"/v1/models/{model_id}"))
    print(f"\nGET /v1/models/{model_id}: ONNX {model['size_bytes']} bytes, sha256 {model['onnx_sha256'][:16]}..., "
          f"parity with torch: max |dp| {model['parity']['max_abs_diff']:.2e} on {model['parity']['images']} images")
    images = _held_out_pngs(config)
    files = [("images", (f"digit-{i}.png", png, "image/png")) for i, (_, png) in enumerate(images)]
    answer = _check(client.post(f"/v1/models/{model_id}/predict", files=files, data={"top_k": "3"}))
    print(f"POST /v1/models/{model_id}/predict with {len(images)} held-out test images:")
    print(f"{'true':>4} {'predicted':>9} {'p':>6} {'group':>7} {'group acc %':>11} {'group ECE %':>11}   top-3")
    for (label, _), prediction in zip(images, answer["predictions"], strict=True):
        best = prediction["predicted"]
        top = ", ".join(f"{c['label']}:{c['probability']:.2f}" for c in prediction["top_k"])
        print(f"{label:>4} {best['label']:>9} {best['probability']:>6.3f} {best['group']:>7} "
              f"{pct(best['group_calibration']['accuracy'], 11)} {pct(best['group_calibration']['ece'], 11)}"
              f"   {top}")
    calibration = _check(client.get(f"/v1/models/{model_id}/calibration"))
    print("\ncalibration of the served ONNX model on the test split (GET .../calibration):")
    print(f"{'group':<8} {'n':>5} {'acc %':>7} {'ECE %':>7}  reliability (confidence bin: accuracy, count)")
    for name, group in calibration["groups"].items():
        bins = " ".join(f"{b['upper']:.2f}:{100 * b['accuracy']:.0f}%/{b['count']}"
                        for b in group["bins"] if b["count"])
        print(f"{name:<8} {group['n']:>5} {pct(group['accuracy'], 7)} {pct(group['ece'], 7)}  {bins}")
