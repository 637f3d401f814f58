"""Start the serving tools a user would pick instead of ours on the same ONNX file, each in its own virtual
environment (created under the cache folder from PyPI on first use: BentoML and TorchServe must not share
packages with the service, nor with each other), and stop them again.

- bare FastAPI + onnxruntime (`bare_fastapi.py`, this environment): decode, run the session inline;
- BentoML (`bento_service.py`): one worker, its defaults;
- TorchServe (`torchserve_handler.py`, needs Java 17): the same handler work with TorchServe's request
  batching (batch 16, 5 ms), its default worker count for this host's cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
PACKAGES = {
    "bentoml": ["bentoml", "onnxruntime", "pillow", "numpy"],
    # TorchServe's worker imports torch; the pin matches the service's (a local wheel where pip has one)
    "torchserve": ["torch==2.14.1", "torchserve", "torch-model-archiver", "onnxruntime", "pillow", "numpy",
                   "pyyaml"],
}
TORCHSERVE_BATCH, TORCHSERVE_DELAY_MS = 16, 5


@dataclass
class Server:
    name: str
    port: int
    path: str  # the predict path
    field: str  # the multipart field holding the image
    process: subprocess.Popen
    log: Path
    cleanup: list = field(default_factory=list)

    def stop(self) -> None:
        for step in self.cleanup:
            step()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def environment(cache: Path, name: str) -> Path:
    """The venv of one tool, created and installed on first use; returns its bin folder."""
    venv = cache / name
    marker = venv / ".installed"
    if not marker.exists():
        print(f"installing {name} into {venv} (first use only)...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *PACKAGES[name]], check=True)
        marker.touch()
    return venv / "bin"


def _wait(url: str, process: subprocess.Popen, log: Path, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url} exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {seconds:.0f} s: {log.read_text()[-2000:]}")


def _spawn(command: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)


def start_bare(model: Path, port: int, workdir: Path) -> Server:
    log = workdir / "bare.log"
    env = {**os.environ, "H2T_BENCH_MODEL": str(model)}
    process = _spawn([sys.executable, "-m", "uvicorn", "bare_fastapi:app", "--host", "127.0.0.1", "--port", str(port),
                      "--log-level", "warning", "--no-access-log"], HERE, env, log)
    server = Server("bare FastAPI + onnxruntime", port, "/predict", "images", process, log)
    _wait(f"http://127.0.0.1:{port}/docs", process, log)
    return server


def start_bentoml(cache: Path, model: Path, port: int, workdir: Path) -> Server:
    bin_dir = environment(cache, "bentoml")
    log = workdir / "bentoml.log"
    env = {**os.environ, "H2T_BENCH_MODEL": str(model), "BENTOML_HOME": str(workdir / "bentoml-home"),
           "PATH": f"{bin_dir}:{os.environ['PATH']}", "BENTOML_DO_NOT_TRACK": "true"}
    process = _spawn([str(bin_dir / "bentoml"), "serve", "bento_service:OnnxClassifier", "--host", "127.0.0.1",
                      "--port", str(port)], HERE, env, log)
    server = Server("BentoML", port, "/predict", "images", process, log)
    _wait(f"http://127.0.0.1:{port}/readyz", process, log)
    return server


def start_torchserve(cache: Path, model: Path, ports: tuple[int, int, int], workdir: Path) -> list[Server]:
    """One TorchServe serving the model twice: with request batching, and without (batch 1)."""
    if shutil.which("java") is None:
        raise RuntimeError("TorchServe needs Java 17 (Debian: apt-get install openjdk-17-jre-headless)")
    bin_dir = environment(cache, "torchserve")
    store, log = workdir / "model-store", workdir / "torchserve.log"
    store.mkdir(exist_ok=True)
    staged = workdir / "torchserve-files"
    staged.mkdir(exist_ok=True)
    shutil.copy(model, staged / "model.onnx")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "TS_DISABLE_TOKEN_AUTHORIZATION": "true"}
    for name in ("h2t", "h2t1"):  # the same files twice: one model batched, one not
        subprocess.run([str(bin_dir / "torch-model-archiver"), "--model-name", name, "--version", "1.0", "--handler",
                        str(HERE / "torchserve_handler.py"), "--extra-files",
                        f"{staged / 'model.onnx'},{HERE / 'common.py'}", "--export-path", str(store), "-f"],
                       check=True, env=env)
    inference, management, metrics = ports
    config = workdir / "config.properties"
    config.write_text("\n".join([
        f"inference_address=http://127.0.0.1:{inference}", f"management_address=http://127.0.0.1:{management}",
        f"metrics_address=http://127.0.0.1:{metrics}", f"model_store={store}", "load_models=h2t.mar,h2t1.mar",
        "disable_token_authorization=true",
        "install_py_dep_per_model=false", "enable_envvars_config=false",
        "models=" + json.dumps({"h2t": {"1.0": {"marName": "h2t.mar", "batchSize": TORCHSERVE_BATCH,
                                                  "maxBatchDelay": TORCHSERVE_DELAY_MS}},
                                "h2t1": {"1.0": {"marName": "h2t1.mar", "batchSize": 1, "maxBatchDelay": 0}}}), ""]))
    process = _spawn([str(bin_dir / "torchserve"), "--start", "--foreground", "--ncs", "--ts-config", str(config),
                      "--model-store", str(store), "--disable-token-auth"], workdir, env, log)
    server = Server(f"TorchServe (batch {TORCHSERVE_BATCH}, {TORCHSERVE_DELAY_MS} ms)", inference,
                    "/predictions/h2t", "data", process, log)
    server.cleanup.append(lambda: subprocess.run([str(bin_dir / "torchserve"), "--stop"], env=env,
                                                 capture_output=True, timeout=60))
    unbatched = Server("TorchServe (batch 1)", inference, "/predictions/h2t1", "data", process, log)
    for name in ("h2t", "h2t1"):
        _wait(f"http://127.0.0.1:{management}/models/{name}", process, log)
        _answers(f"http://127.0.0.1:{inference}/predictions/{name}", process, log)  # its workers are up too
    return [server, unbatched]


def _answers(url: str, process: subprocess.Popen, log: Path, seconds: float = 180) -> None:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buffer, "PNG")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url} exited: {log.read_text()[-2000:]}")
        try:
            if httpx.post(url, files={"data": ("x.png", buffer.getvalue())}, timeout=10).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} never predicted within {seconds:.0f} s: {log.read_text()[-3000:]}")


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants, read from /proc (Linux)."""
    ticks = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    stats: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        child, parent = int(entry.name), int(fields[1])
        children.setdefault(parent, []).append(child)
        stats[child] = (int(fields[11]) + int(fields[12])) / ticks
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        total += stats.get(current, 0.0)
        todo.extend(children.get(current, []))
    return total
