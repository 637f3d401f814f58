"""Resident memory of scanning and streaming an ImageFolder tree: does it stay flat in the number of images?

Builds once (cached under --work, in parallel processes) ImageFolder trees of N small real JPEGs: CIFAR-100
training images resized (bilinear) to a random 32..64 px per side, quality 90, long-tailed over the 100
classes (imbalance ratio 100, exponential profile; a class with more images than CIFAR has reuses its
images at other sizes), and a test split of N / 10 from the CIFAR-100 test images, balanced. Then, for
each N, in FRESH subprocesses so that the peaks of one size never mix with another's:

  scan    `scan_reference(FolderDataset(folder=..., image_size=64), data_root)` alone (torch is not
          imported: the scan is the worker's, torch-free)
  epoch   `load_dataset(..., loader=LoaderConfig(mode="streaming", workers=2))` (which scans again and
          measures the normalisation on a sample), one stage-1 epoch of the data path through
          `source.steps` (batch 256, each batch summed, none kept) and the test pass `source.test_images(500)`

Each child reports its own peak (`getrusage(RUSAGE_SELF).ru_maxrss`), its peak right after its imports
(the baseline), and for the epoch the largest peak of its worker processes (`RUSAGE_CHILDREN`, the
DataLoader workers, which are forked from it and so count the pages they share with it). Each child runs
--repeats times (interleaved over the sizes), since the main process's peak varies from run to run with
how glibc's heap keeps freed batch tensors (see --mmap-threshold); the table shows the largest peak and the
median time. The last row divides the largest N's peaks by the smallest N's (goal <= 1.3).

  python benchmarks/streaming_memory.py                        # N = 10,000 and 100,000, 3 repeats (2-3 min)
  python benchmarks/streaming_memory.py --sizes 1000 10000 --repeats 1     # quicker
  python benchmarks/streaming_memory.py --mmap-threshold 131072             # without glibc's heap retention
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLASSES = 100
IMBALANCE = 0.01
MIN_SIDE, MAX_SIDE, QUALITY = 32, 64, 90
IMAGE_SIZE = 64
FEATURE_CHANNELS = 64  # ResNet-32's; stage 1 draws nothing with it

_PIXELS: dict[str, object] = {}  # split -> (images HWC, labels); set before the pool forks


def max_rss_mib(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux


def hwm_mib() -> float:
    """The kernel's high-water mark of this process's own memory map (VmHWM), a cross-check of ru_maxrss."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---------------------------------------------------------------------------------------------- the trees

def _write_chunk(jobs: list[tuple[str, int, str, int, int]]) -> int:
    from PIL import Image

    written = 0
    for split, index, path, width, height in jobs:
        images = _PIXELS[split][0]
        Image.fromarray(images[index]).resize((width, height), Image.BILINEAR).save(path, "JPEG", quality=QUALITY)
        written += os.path.getsize(path)
    return written


def train_counts(n: int) -> list[int]:
    """Images per class summing to n, long-tailed (exponential profile, n_max / n_min = 1 / IMBALANCE)."""
    weights = [IMBALANCE ** (i / (CLASSES - 1)) for i in range(CLASSES)]
    counts = [max(1, int(n * w / sum(weights))) for w in weights]
    for i in range(n - sum(counts)):  # the rounding remainder, to the head classes
        counts[i % CLASSES] += 1
    return counts


def tree_name(n: int) -> str:
    return f"lt-{n}"


def build_tree(work: Path, data_root: Path, n: int, processes: int) -> tuple[Path, dict]:
    """`work/lt-<n>/{train,test}/<class>/*.jpg`, built only when missing or built with other parameters."""
    import numpy as np

    from models.contract.catalog import cifar100_pixels

    params = {"n": n, "classes": CLASSES, "imbalance": IMBALANCE, "sides": [MIN_SIDE, MAX_SIDE],
              "quality": QUALITY, "test": n // 10, "version": 1}
    tree = work / tree_name(n)
    marker = tree / "params.json"
    if marker.exists() and json.loads(marker.read_text()).get("params") == params:
        return tree, json.loads(marker.read_text())
    if tree.exists():
        subprocess.run(["rm", "-rf", str(tree)], check=True)
    rng = np.random.default_rng(n)
    jobs = []
    test_counts = [n // 10 // CLASSES + (1 if c < (n // 10) % CLASSES else 0) for c in range(CLASSES)]
    for split, counts in (("train", train_counts(n)), ("test", test_counts)):
        images, labels, names = cifar100_pixels(data_root, split)
        _PIXELS[split] = (images, labels)
        for c, count in enumerate(counts):
            if count == 0:
                continue
            folder = tree / split / names[c]
            folder.mkdir(parents=True)
            pool = np.flatnonzero(labels == c)
            sides = rng.integers(MIN_SIDE, MAX_SIDE + 1, size=(count, 2))
            for k in range(count):
                jobs.append((split, int(pool[k % len(pool)]), str(folder / f"{k:06d}.jpg"), int(sides[k, 0]),
                             int(sides[k, 1])))
    started = time.perf_counter()
    chunks = [jobs[i:i + 500] for i in range(0, len(jobs), 500)]
    with get_context("fork").Pool(processes) as pool:
        written = sum(pool.imap_unordered(_write_chunk, chunks))
    _PIXELS.clear()
    info = {"params": params, "files": len(jobs), "bytes": written, "seconds": time.perf_counter() - started}
    marker.write_text(json.dumps(info))
    return tree, info


# ---------------------------------------------------------------------------------------------- the children

def child_scan(work: Path, folder: str) -> dict:
    from models.contract.config import FolderDataset
    from models.contract.reference import scan_reference

    base = max_rss_mib()
    started = time.perf_counter()
    index = scan_reference(FolderDataset(folder=folder, image_size=IMAGE_SIZE), work)
    seconds = time.perf_counter() - started
    return {"base_mib": base, "peak_mib": max_rss_mib(), "hwm_mib": hwm_mib(), "seconds": seconds,
            "train": len(index.splits["train"]), "test": len(index.splits["test"]),
            "unreadable": len(index.unreadable)}


def child_epoch(work: Path, folder: str, workers: int, batch: int, device_name: str) -> dict:
    import torch

    from models.contract.config import AugmentConfig, FolderDataset, LoaderConfig, RunConfig, Stage1Config
    from models.core.data import load_dataset
    from models.core.source import source_for
    from models.core.stages import Stage1Recipe

    device = torch.device(device_name)
    base = max_rss_mib()
    loader = LoaderConfig(mode="streaming", workers=workers)
    started = time.perf_counter()
    dataset = load_dataset(FolderDataset(folder=folder, image_size=IMAGE_SIZE), work, augment=AugmentConfig(),
                           loader=loader)
    loaded, after_load = time.perf_counter(), max_rss_mib()
    source = source_for(dataset, RunConfig(loader=loader), device)
    steps = Stage1Recipe(Stage1Config(batch_size=batch, mixup_alpha=0)).draw_epoch(
        source.train_labels, source.augmentation, FEATURE_CHANNELS, torch.Generator().manual_seed(0), device)
    sink, seen = torch.zeros((), device=device), 0
    for (b,) in source.steps([s.requests for s in steps]):
        sink += b.images.sum()
        seen += len(b.labels)
    trained = time.perf_counter()
    tested = 0
    for images in source.test_images(500):
        sink += images.sum()
        tested += len(images)
    float(sink)
    done = time.perf_counter()
    return {"base_mib": base, "after_load_mib": after_load, "peak_mib": max_rss_mib(), "hwm_mib": hwm_mib(),
            "workers_peak_mib": max_rss_mib(resource.RUSAGE_CHILDREN), "load_s": loaded - started,
            "epoch_s": trained - loaded, "test_s": done - trained, "seconds": done - started, "train": seen,
            "test": tested, "stream": dataset.streams, "torch": torch.__version__}


def worst(results: list[dict]) -> dict:
    """Repeats of one child in one answer: the largest of each peak, the median of each time."""
    out = dict(results[0])
    for key in results[0]:
        values = [r[key] for r in results]
        if key.endswith("_mib"):
            out[key] = max(values)
        elif key.endswith("_s") or key == "seconds":
            out[key] = statistics.median(values)
    out["peaks"] = [r["peak_mib"] for r in results]
    return out


def run_child(args: argparse.Namespace, kind: str, folder: str, n: int = 0) -> dict:
    """Run a child of this script and read its JSON answer. Everything that takes memory (building the trees
    included) runs in a child: Linux keeps a process's peak RSS across exec in the new program's ru_maxrss,
    so this parent must stay small for the children's peaks to be their own."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--folder", folder, "--work",
               args.work, "--workers", str(args.workers), "--batch-size", str(args.batch_size), "--device",
               args.device, "--data-root", args.data_root, "--build-processes", str(args.build_processes),
               "--sizes", str(n)]
    env = dict(os.environ)
    if args.mmap_threshold is not None and kind != "build":
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)  # glibc: a fixed threshold, not the dynamic one
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"the {kind} child for {folder} failed ({done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"),
                        help="holds cifar-100-python/ (the source of the pixels)")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "h2t-bench-memory"),
                        help="where the trees are built and cached (the data root of the datasets)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="training images per tree")
    parser.add_argument("--repeats", type=int, default=3,
                        help="fresh children per size and kind; the table shows the largest peak, the median time")
    parser.add_argument("--workers", type=int, default=2, help="decoding processes of the streaming path")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--build-processes", type=int, default=os.cpu_count())
    parser.add_argument("--mmap-threshold", type=int, default=None, metavar="BYTES",
                        help="run the measured children with glibc's MALLOC_MMAP_THRESHOLD_=BYTES (e.g. 131072): "
                        "blocks above it are always mmapped and go back to the system when freed (default: "
                        "glibc's dynamic threshold)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", choices=["build", "scan", "epoch"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        sys.path.insert(0, str(REPO))
        work = Path(args.work)
        if args.child == "build":
            result = build_tree(work, Path(args.data_root), args.sizes[0], args.build_processes)[1]
        elif args.child == "scan":
            result = child_scan(work, args.folder)
        else:
            result = child_epoch(work, args.folder, args.workers, args.batch_size, args.device)
        print(json.dumps(result))
        return 0

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sizes = sorted(args.sizes)
    infos = {n: run_child(args, "build", tree_name(n), n) for n in sizes}
    scans: dict[int, list[dict]] = {n: [] for n in sizes}
    epochs: dict[int, list[dict]] = {n: [] for n in sizes}
    for _ in range(args.repeats):  # interleaved over the sizes, so that drift does not favour one
        for n in sizes:
            scans[n].append(run_child(args, "scan", tree_name(n)))
            epochs[n].append(run_child(args, "epoch", tree_name(n)))
            if scans[n][-1]["train"] != n or epochs[n][-1]["train"] != n or not epochs[n][-1]["stream"]:
                raise SystemExit(f"N={n}: scanned {scans[n][-1]['train']}, streamed {epochs[n][-1]['train']}")
    rows = [(n, infos[n], worst(scans[n]), worst(epochs[n])) for n in sizes]

    print(f"CPUs: {os.cpu_count()}, torch {rows[0][3]['torch']}, python {sys.version.split()[0]}, "
          f"device {args.device}; "
          f"workers {args.workers}, batch {args.batch_size}, image size {IMAGE_SIZE} (pad crops), test split N / 10, "
          f"test batches of 500; glibc mmap threshold "
          f"{'dynamic (default)' if args.mmap_threshold is None else args.mmap_threshold}")
    for n, info, _, _ in rows:
        print(f"  N={n}: {info['files']} JPEGs ({info['bytes'] / 2**20:.0f} MiB) under {work / tree_name(n)} "
              f"(built in {info['seconds']:.0f} s, cached)")
    print()
    header = ("N", "scan s", "scan peak MiB", "scan base MiB", "epoch peak MiB (main)", "main base MiB",
              "main after load MiB", "worker peak MiB", "load s", "epoch s", "test s", "main peaks of the repeats")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---:" for _ in header) + "|")
    for n, _, scan, epoch in rows:
        print(f"| {n:,} | {scan['seconds']:.1f} | {scan['peak_mib']:.0f} | {scan['base_mib']:.0f} | "
              f"{epoch['peak_mib']:.0f} | {epoch['base_mib']:.0f} | {epoch['after_load_mib']:.0f} | "
              f"{epoch['workers_peak_mib']:.0f} | {epoch['load_s']:.1f} | {epoch['epoch_s']:.1f} | "
              f"{epoch['test_s']:.1f} | {', '.join(f'{p:.0f}' for p in epoch['peaks'])} |")
    if len(rows) > 1:
        (n0, _, scan0, epoch0), (n1, _, scan1, epoch1) = rows[0], rows[-1]
        peaks = {"scan": (scan0["peak_mib"], scan1["peak_mib"]),
                 "epoch (main)": (epoch0["peak_mib"], epoch1["peak_mib"]),
                 "workers": (epoch0["workers_peak_mib"], epoch1["workers_peak_mib"])}
        ratios = {k: b / a for k, (a, b) in peaks.items()}
        print(f"| {n1:,} / {n0:,} | | {ratios['scan']:.2f} | | {ratios['epoch (main)']:.2f} | | | "
              f"{ratios['workers']:.2f} | | | | |")
        print(f"\npeak ratio, N={n1:,} / N={n0:,} (goal <= 1.3): " + ", ".join(
            f"{k} {v:.2f}{'' if v <= 1.3 else ' (OVER)'}" for k, v in ratios.items()))
        print("peak growth per added training image (with its test tenth): " + ", ".join(
            f"{k} {(b - a) * 2**20 / (n1 - n0):.0f} bytes" for k, (a, b) in peaks.items()))
    for n, _, scan, epoch in rows:  # ru_maxrss should be the child's own peak: say so when VmHWM disagrees
        for name, child in (("scan", scan), ("epoch", epoch)):
            if abs(child["peak_mib"] - child["hwm_mib"]) > 0.05 * child["hwm_mib"]:
                print(f"note: N={n} {name}: ru_maxrss {child['peak_mib']:.0f} MiB but VmHWM {child['hwm_mib']:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
