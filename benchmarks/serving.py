"""Serving speed of an exported ResNet-32 (CIFAR-100 shape: 32x32 in, 100 classes out), in one run:

1. onnxruntime vs torch eager (both fp32, CPU threads as configured) at batch 1 and 32;
2. HTTP `POST /v1/models/{id}/predict` (one PNG per request) through a real `h2t serve` process:
   throughput and p50/p95/p99 latency at several client concurrencies, with request batching on
   and off; and the Open Inference Protocol's `POST /v2/models/{id}/infer` (the same image as a UINT8
   binary tensor, binary probabilities back) on the batching server. The load generator runs on this
   machine against 127.0.0.1 only, a bounded number of requests per point.

  python benchmarks/serving.py                       # full run (a few minutes)
  python benchmarks/serving.py --requests 200 --rounds 1   # quicker
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.contract.onnx_model import ModelSpec, load_session, run_probabilities  # noqa: E402
from models.core.backbones import build_classifier  # noqa: E402
from models.core.export import export_onnx  # noqa: E402

NUM_CLASSES, SIZE = 100, 32


def make_model(workdir: Path):
    torch.manual_seed(0)
    model = build_classifier("resnet32", NUM_CLASSES).eval()
    groups = tuple(["many"] * 35 + ["medium"] * 35 + ["few"] * 30)
    spec = ModelSpec(SIZE, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                     tuple(f"class_{i}" for i in range(NUM_CLASSES)), groups)
    images = np.random.default_rng(0).integers(0, 256, (64, 3, SIZE, SIZE), dtype=np.uint8)
    result = export_onnx(model, spec, workdir / "model.onnx", images)
    return model, spec, result


def time_it(fn, min_seconds: float = 2.0) -> float:
    """Calls per second of fn (after a warm-up), over at least min_seconds."""
    for _ in range(3):
        fn()
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < min_seconds:
        fn()
        calls += 1
    return calls / elapsed


def engine_table(model, path: Path, rounds: int) -> list[str]:
    """Rounds alternate torch and onnxruntime so that machine drift hits both; medians are reported."""
    session = load_session(path)
    rows = ["| batch | torch eager img/s | onnxruntime img/s | onnxruntime / torch (median of round ratios) |",
            "|---|---|---|---|"]
    for batch in (1, 32):
        x = np.random.default_rng(1).random((batch, 3, SIZE, SIZE), dtype=np.float32)
        xt = torch.from_numpy(x)

        def torch_step(xt: torch.Tensor = xt) -> None:
            with torch.inference_mode():
                torch.softmax(model(xt), dim=1)

        def ort_step(x: np.ndarray = x) -> None:
            run_probabilities(session, x)

        torch_rates, ort_rates = [], []
        for _ in range(rounds):
            torch_rates.append(batch * time_it(torch_step, 1.0))
            ort_rates.append(batch * time_it(ort_step, 1.0))
        ratio = statistics.median(o / t for o, t in zip(ort_rates, torch_rates, strict=True))
        rows.append(f"| {batch} | {statistics.median(torch_rates):,.0f} | {statistics.median(ort_rates):,.0f} | "
                    f"{ratio:.2f} |")
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def register(home: Path, result, spec: ModelSpec) -> str:
    """A store holding one succeeded run and its model, recorded as a worker records them."""
    from datetime import timedelta

    from models.contract.config import RunConfig
    from models.contract.layout import ONNX_KIND, ArtifactLayout
    from models.contract.metrics import evaluate_predictions
    from service.store import runs
    from service.store.db import session_scope
    from service.store.migrate import upgrade_head
    from service.store.orm import DatasetRow, RunRow, utcnow
    from service.store.runs import ExportedModel, StoredFile

    os.environ["H2T_DATABASE_URL"] = url = f"sqlite:///{home / 'h2t.db'}"
    upgrade_head(url)
    store = ArtifactLayout(home / "artifacts")
    with session_scope(url) as session:
        classes = len(spec.class_names)
        dataset = DatasetRow(name="bench", spec={"builtin": "cifar100"}, class_names=list(spec.class_names),
                             train_counts=[1] * classes, test_counts=[1] * classes, image_size=spec.image_size)
        session.add(dataset)
        session.flush()
        run = RunRow(dataset_id=dataset.id, config=RunConfig().model_dump(mode="json"))
        session.add(run)
        session.flush()
        run_id = run.id
    target = store.run(run_id).onnx
    target.parent.mkdir(parents=True)
    target.write_bytes(result.path.read_bytes())
    # the calibration is not what this benchmark measures: any valid report serves
    classes = len(spec.class_names)
    calibration = evaluate_predictions(np.eye(classes), np.arange(classes), list(spec.groups))
    model = ExportedModel(StoredFile(ONNX_KIND, store.relative(target), result.size_bytes, result.sha256), spec,
                          result.parity_max_abs_diff, result.parity_images, calibration)
    with session_scope(url) as session:
        now = utcnow()
        assert runs.claim(session, run_id, "bench", "bench", now, now - timedelta(hours=1))
        assert runs.succeed(session, run_id, "bench", model, [])
    return run_id


def multipart_request(host: str, path: str, key: str | None, png: bytes, field: str = "images",
                      media: str = "image/png") -> bytes:
    boundary = "h2tbenchboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"x\"\r\n"
            f"Content-Type: {media}\r\n\r\n").encode() + png + f"\r\n--{boundary}--\r\n".encode()
    auth = f"X-API-Key: {key}\r\n" if key else ""
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\n{auth}"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def oip_request(host: str, path: str, key: str, image_chw: np.ndarray) -> bytes:
    """One image as a UINT8 binary tensor, asking for the probabilities as binary data (as tritonclient does)."""
    import json

    header = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, *image_chw.shape],
                                     "parameters": {"binary_data_size": image_chw.size}}],
                         "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}).encode()
    body = header + np.ascontiguousarray(image_chw, dtype=np.uint8).tobytes()
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nX-API-Key: {key}\r\n"
            f"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: {len(header)}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def _user(port: int, request: bytes, count: list[int], latencies: list[float]) -> None:
    """One keep-alive connection sending requests back to back (a lean client: the 2 cores are shared)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while count[0] > 0:
            count[0] -= 1
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = head.split(b" ", 2)[1]
            headers = {k.strip().lower(): v.strip() for k, _, v in
                       (line.partition(b":") for line in head.split(b"\r\n")[1:] if line)}
            if b"content-length" in headers:
                await reader.readexactly(int(headers[b"content-length"]))
            else:  # chunked
                while (size := int((await reader.readuntil(b"\r\n")).strip(), 16)) > 0:
                    await reader.readexactly(size + 2)
                await reader.readuntil(b"\r\n")
            latencies.append(time.perf_counter() - started)
            if status != b"200":
                raise RuntimeError(f"HTTP {status.decode()}")
    finally:
        writer.close()


async def load(port: int, request: bytes, concurrency: int, requests: int) -> tuple[float, list[float]]:
    await asyncio.gather(*(_user(port, request, [2], []) for _ in range(concurrency)))  # warm-up, connections
    latencies: list[float] = []
    count = [requests]
    started = time.perf_counter()
    await asyncio.gather(*(_user(port, request, count, latencies) for _ in range(concurrency)))
    return len(latencies) / (time.perf_counter() - started), latencies


def pct(values: list[float], q: int) -> float:
    """The q-th percentile of latencies in seconds, in milliseconds."""
    return 1000 * statistics.quantiles(values, n=100)[q - 1]


def http_table(home: Path, model_id: str, concurrencies: list[int], requests: int, rounds: int) -> list[str]:
    import httpx
    from PIL import Image

    buffer = io.BytesIO()
    pixels = np.random.default_rng(2).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "PNG")
    png = buffer.getvalue()
    key = secrets.token_urlsafe(8)
    servers: dict[bool, tuple[subprocess.Popen, int]] = {}
    rates: dict[tuple[str, int], list[float]] = {}  # (variant, concurrency)
    latencies: dict[tuple[str, int], list[float]] = {}
    try:
        for batching in (False, True):
            port = free_port()
            env = {**os.environ, "H2T_ARTIFACT_DIR": str(home / "artifacts"), "H2T_API_KEYS": key,
                   "H2T_PREDICT_BATCHING": str(batching).lower(), "H2T_BROKER_URL": f"sqla+sqlite:///{home / 'b.db'}"}
            servers[batching] = (subprocess.Popen(
                [sys.executable, "-m", "h2t", "serve", "--port", str(port), "--log-level", "WARNING"],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), port)
        for _, port in servers.values():
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
        # rounds interleave the two servers and all concurrencies, so drift hits both alike
        for _ in range(rounds):
            for concurrency in concurrencies:
                for batching, (_, port) in servers.items():
                    host = f"127.0.0.1:{port}"
                    variants = [("predict, batching on" if batching else "predict, batching off",
                                 multipart_request(host, f"/v1/models/{model_id}/predict", key, png))]
                    if batching:
                        variants.append(("OIP v2 infer, batching on", oip_request(
                            host, f"/v2/models/{model_id}/infer", key, pixels.transpose(2, 0, 1))))
                    for variant, request in variants:
                        rate, lat = asyncio.run(load(port, request, concurrency, requests))
                        rates.setdefault((variant, concurrency), []).append(rate)
                        latencies.setdefault((variant, concurrency), []).extend(lat)
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(timeout=20)

    rows = ["| concurrency | endpoint | requests/s (median of rounds) | p50 ms | p95 ms | p99 ms | vs predict, "
            "batching off |", "|---|---|---|---|---|---|---|"]
    for concurrency in concurrencies:
        off = statistics.median(rates[("predict, batching off", concurrency)])
        for variant in ("predict, batching off", "predict, batching on", "OIP v2 infer, batching on"):
            rate, lat = statistics.median(rates[(variant, concurrency)]), latencies[(variant, concurrency)]
            ratio = f"{rate / off:.2f}" if variant != "predict, batching off" else ""
            rows.append(f"| {concurrency} | {variant} | {rate:,.0f} | {pct(lat, 50):.1f} | "
                        f"{pct(lat, 95):.1f} | {pct(lat, 99):.1f} | {ratio} |")
    return rows


def start_h2t(home: Path, key: str, port: int, log: Path, **settings: str) -> subprocess.Popen:
    """`h2t serve` on the benchmark's store; `settings`: further H2T_* variables (H2T_PREDICT_BATCHING="false")."""
    import httpx

    env = {**os.environ, "H2T_ARTIFACT_DIR": str(home / "artifacts"), "H2T_API_KEYS": key,
           "H2T_BROKER_URL": f"sqla+sqlite:///{home / 'b.db'}", **settings}
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "h2t", "serve", "--host", "127.0.0.1", "--port", str(port),
                                    "--log-level", "WARNING"], env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError(f"h2t serve did not start: {log.read_text()[-2000:]}")


def rivals_table(home: Path, model_id: str, onnx: Path, cache: Path, concurrencies: list[int], requests: int,
                 rounds: int, processes: int = 1) -> list[str]:
    """Ours (predict and OIP v2, default settings: one process, batching on; and predict with `processes` API
    processes when more than 1) against the bare FastAPI + onnxruntime endpoint, BentoML and TorchServe on the
    same ONNX file and the same PNG, interleaved."""
    from PIL import Image

    sys.path.insert(0, str(Path(__file__).resolve().parent / "rivals"))
    from run import start_bare, start_bentoml, start_torchserve, tree_cpu_seconds

    buffer = io.BytesIO()
    pixels = np.random.default_rng(2).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "PNG")
    png, key = buffer.getvalue(), secrets.token_urlsafe(8)
    ours = start_h2t(home, key, free_port(), home / "h2t.log")
    port = int(ours.args[ours.args.index("--port") + 1])
    host = f"127.0.0.1:{port}"
    servers = []  # (name, port, request, pid whose process tree serves it)
    stoppers = [lambda: (ours.terminate(), ours.wait(timeout=20))]
    try:
        servers.append(("h2t predict", port, multipart_request(host, f"/v1/models/{model_id}/predict", key, png),
                        ours.pid))
        servers.append(("h2t OIP v2 infer (UINT8 binary)", port,
                        oip_request(host, f"/v2/models/{model_id}/infer", key, pixels.transpose(2, 0, 1)), ours.pid))
        if processes > 1:
            several = start_h2t(home, key, free_port(), home / "h2t-processes.log", H2T_API_PROCESSES=str(processes))
            stoppers.append(lambda: (several.terminate(), several.wait(timeout=30)))
            several_port = int(several.args[several.args.index("--port") + 1])
            servers.append((f"h2t predict, {processes} API processes", several_port, multipart_request(
                f"127.0.0.1:{several_port}", f"/v1/models/{model_id}/predict", key, png), several.pid))
        for start in (lambda: [start_bare(onnx, free_port(), home)],
                      lambda: [start_bentoml(cache, onnx, free_port(), home)],
                      lambda: start_torchserve(cache, onnx, (free_port(), free_port(), free_port()), home)):
            started = start()
            stoppers.append(started[0].stop)
            for server in started:
                servers.append((server.name, server.port, multipart_request(
                    f"127.0.0.1:{server.port}", server.path, None, png, server.field), server.process.pid))
        rates: dict[tuple[str, int], list[float]] = {}
        latencies: dict[tuple[str, int], list[float]] = {}
        cpu: dict[tuple[str, int], list[float]] = {}
        for _ in range(rounds):  # interleaved: drift of this noisy machine hits every server alike
            for concurrency in concurrencies:
                for name, server_port, request, pid in servers:
                    before = tree_cpu_seconds(pid)
                    # bounded: a server that stops answering fails the benchmark rather than hanging it
                    rate, lat = asyncio.run(asyncio.wait_for(load(server_port, request, concurrency, requests),
                                                             timeout=120 + requests))
                    cpu.setdefault((name, concurrency), []).append(
                        (tree_cpu_seconds(pid) - before) / (len(lat) + 2 * concurrency))  # warm-up included
                    rates.setdefault((name, concurrency), []).append(rate)
                    latencies.setdefault((name, concurrency), []).extend(lat)
    finally:
        for stop in reversed(stoppers):
            stop()

    rows = ["| concurrency | server | requests/s (median of rounds) | p50 ms | p99 ms | server CPU ms per request | "
            "vs best other tool |", "|---|---|---|---|---|---|---|"]
    for concurrency in concurrencies:
        others = [statistics.median(rates[(name, concurrency)]) for name, *_ in servers
                  if not name.startswith(("h2t", "bare"))]
        for name, *_ in servers:
            rate, lat = statistics.median(rates[(name, concurrency)]), latencies[(name, concurrency)]
            versus = f"{rate / max(others):.2f}x" if name.startswith("h2t") and others else ""
            rows.append(f"| {concurrency} | {name} | {rate:,.0f} | {pct(lat, 50):.1f} | {pct(lat, 99):.1f} | "
                        f"{1000 * statistics.median(cpu[(name, concurrency)]):.2f} | {versus} |")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=800, help="requests per concurrency point and round")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rivals", action="store_true", help="only the comparison with the bare FastAPI endpoint, "
                        "BentoML and TorchServe (installed into venvs under --rivals-cache on first use; TorchServe "
                        "needs Java 17)")
    parser.add_argument("--rivals-cache", type=Path, default=Path.home() / ".cache" / "h2t-bench")
    parser.add_argument("--processes", type=int, default=1, help="with --rivals: also our predict endpoint served by "
                        "this many API processes (h2t serve --processes)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="h2t-serving-bench-") as tmp:
        home = Path(tmp)
        model, spec, result = make_model(home)
        print(f"ResNet-32, {NUM_CLASSES} classes, {SIZE}x{SIZE}; CPU threads: torch {torch.get_num_threads()}, "
              f"onnxruntime default; {os.cpu_count()} cores\n")
        model_id = register(home, result, spec)
        if args.rivals:
            print(f"One {SIZE}x{SIZE} PNG per request (the OIP row: the same image as a UINT8 tensor), "
                  f"{args.requests} requests per point and round, {args.rounds} interleaved rounds, keep-alive "
                  "clients on 127.0.0.1; every server runs the same ONNX file through onnxruntime on the CPU:\n")
            print("\n".join(rivals_table(home, model_id, result.path, args.rivals_cache, args.concurrency,
                                          args.requests, args.rounds, args.processes)))
            return 0
        print("\n".join(engine_table(model, result.path, max(args.rounds, 5))))
        print(f"\nHTTP predict, one {SIZE}x{SIZE} PNG per request, {args.requests} requests per point and round, "
              f"{args.rounds} rounds, one uvicorn process per setting, keep-alive clients on 127.0.0.1:\n")
        print("\n".join(http_table(home, model_id, args.concurrency, args.requests, args.rounds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
