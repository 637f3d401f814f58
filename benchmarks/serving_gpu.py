"""GPU serving of an ImageNet-sized classifier, in one run on a host with a CUDA GPU and `onnxruntime-gpu`:
ResNet-50 (random weights: speed does not depend on them), 1,000 classes, 224 x 224 input (center crop).

1. Engines: torch eager (fp32, CUDA) against onnxruntime's CUDA provider (fp32, our IO-bound runner),
   images per second at batch 1 and 16.
2. HTTP `POST /v1/models/{id}/predict` through a real `h2t serve` process, one 256 x 341 JPEG per request
   (decoded and center-cropped by the server), keep-alive clients on 127.0.0.1: requests/s and p50/p99 at
   concurrency 1 and 16 with request batching on and off (goal at 16: batching on >= 3x off).

  python benchmarks/serving_gpu.py                      # on a GPU host (a few minutes)
  python benchmarks/serving_gpu.py --allow-cpu --requests 40 --rounds 1   # a smoke run of the script on a CPU

Nothing is downloaded: the weights are random, the JPEG is made here.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import free_port, load, multipart_request, pct, register, start_h2t  # noqa: E402

from models.contract.onnx_model import BoundRunner, ModelSpec, load_session, on_cuda  # noqa: E402
from models.core.backbones import build_classifier  # noqa: E402
from models.core.export import export_onnx  # noqa: E402

CLASSES, SIZE, BATCH = 1000, 224, 16


def make_model(workdir: Path):
    torch.manual_seed(0)
    model = build_classifier("resnet50", CLASSES).eval()
    groups = tuple(["many"] * 385 + ["medium"] * 479 + ["few"] * 136)  # ImageNet-LT's split sizes
    spec = ModelSpec(SIZE, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                     tuple(f"class_{i}" for i in range(CLASSES)), groups, "center_crop")
    images = np.random.default_rng(0).integers(0, 256, (8, 3, SIZE, SIZE), dtype=np.uint8)
    return model, spec, export_onnx(model, spec, workdir / "model.onnx", images)


def images_per_second(step, batch: int, seconds: float = 3.0) -> float:
    for _ in range(5):
        step()
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        step()
        calls += 1
    return batch * calls / elapsed


def engine_table(model, path: Path, device: torch.device, rounds: int) -> list[str]:
    session = load_session(path)
    runner = BoundRunner(session, SIZE, BATCH)
    model = model.to(device)
    rows = [f"onnxruntime providers: {session.get_providers()}; page-locked host buffer: {runner.pinned}\n",
            "| batch | torch eager img/s | onnxruntime img/s | onnxruntime / torch (median of round ratios) |",
            "|---|---|---|---|"]
    for batch in (1, BATCH):
        x = np.random.default_rng(1).random((batch, 3, SIZE, SIZE), dtype=np.float32)

        def torch_step(x: np.ndarray = x) -> None:  # from host memory and back, as serving does
            with torch.inference_mode():
                torch.softmax(model(torch.from_numpy(x).to(device)), dim=1).cpu()

        def ort_step(x: np.ndarray = x) -> None:
            runner(x)

        torch_rates, ort_rates = [], []
        for _ in range(rounds):
            torch_rates.append(images_per_second(torch_step, batch))
            ort_rates.append(images_per_second(ort_step, batch))
        ratio = statistics.median(o / t for o, t in zip(ort_rates, torch_rates, strict=True))
        rows.append(f"| {batch} | {statistics.median(torch_rates):,.0f} | {statistics.median(ort_rates):,.0f} | "
                    f"{ratio:.2f} |")
    return rows


def jpeg() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    pixels = np.random.default_rng(2).integers(0, 256, (256, 341, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def http_table(home: Path, model_id: str, requests: int, rounds: int) -> list[str]:
    key, image = secrets.token_urlsafe(8), jpeg()
    servers, processes = {}, []
    try:
        for batching in (False, True):
            process = start_h2t(home, key, free_port(), home / f"h2t-{batching}.log",
                                H2T_PREDICT_BATCHING=str(batching).lower(), H2T_PREDICT_MAX_BATCH=str(BATCH))
            processes.append(process)
            servers[batching] = int(process.args[process.args.index("--port") + 1])
        rates: dict[tuple[bool, int], list[float]] = {}
        latencies: dict[tuple[bool, int], list[float]] = {}
        for _ in range(rounds):  # interleaved, so drift hits both alike
            for concurrency in (1, 16):
                for batching, port in servers.items():
                    request = multipart_request(f"127.0.0.1:{port}", f"/v1/models/{model_id}/predict", key, image,
                                                media="image/jpeg")
                    rate, lat = asyncio.run(asyncio.wait_for(load(port, request, concurrency, requests),
                                                             timeout=300 + requests))
                    rates.setdefault((batching, concurrency), []).append(rate)
                    latencies.setdefault((batching, concurrency), []).extend(lat)
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=30)

    rows = ["| concurrency | batching | requests/s (median of rounds) | p50 ms | p99 ms | on / off |",
            "|---|---|---|---|---|---|"]
    for concurrency in (1, 16):
        off = statistics.median(rates[(False, concurrency)])
        for batching in (False, True):
            rate, lat = statistics.median(rates[(batching, concurrency)]), latencies[(batching, concurrency)]
            ratio = f"{rate / off:.2f}x" if batching else ""
            rows.append(f"| {concurrency} | {'on' if batching else 'off'} | {rate:,.0f} | {pct(lat, 50):.1f} | "
                        f"{pct(lat, 99):.1f} | {ratio} |")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=800, help="requests per point and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--allow-cpu", action="store_true", help="run without a GPU (a smoke run of the script; "
                        "its figures say nothing about GPU serving)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="h2t-gpu-serving-bench-") as tmp:
        home = Path(tmp)
        model, spec, result = make_model(home)
        cuda = torch.cuda.is_available() and on_cuda(load_session(result.path))
        if not cuda and not args.allow_cpu:
            print("no CUDA GPU that both torch and onnxruntime-gpu can use: nothing measured (--allow-cpu runs "
                  "the script on the CPU as a smoke test)", file=sys.stderr)
            return 2
        device = torch.device("cuda" if cuda else "cpu")
        name = torch.cuda.get_device_name() if cuda else "CPU (smoke run, not a GPU measurement)"
        print(f"ResNet-50, {CLASSES} classes, {SIZE} x {SIZE}, fp32; device: {name}\n")
        print("\n".join(engine_table(model, result.path, device, args.rounds)))
        model_id = register(home, result, spec)
        print(f"\nHTTP predict, one 256 x 341 JPEG per request (center crop to {SIZE}), {args.requests} requests per "
              f"point and round, {args.rounds} interleaved rounds, batches of at most {BATCH} images:\n")
        print("\n".join(http_table(home, model_id, args.requests, args.rounds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
