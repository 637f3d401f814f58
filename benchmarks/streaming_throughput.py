"""224-px JPEG training throughput (images/s): our streaming data path vs torchvision's ImageFolder loop.

Builds once (cached under --work) an ImageFolder tree of real JPEGs: CIFAR-100 training images upscaled
(bilinear) to ImageNet-like sizes (each side uniform in --min-side..--max-side px, JPEG quality 90), by
default 20 classes x 75 images. Then, with the same worker count and batch size, measures in one run:

  ours data path         the tree as `FolderDataset(image_size=224)` loaded with
                         `LoaderConfig(mode="streaming")`; a stage-1 epoch drawn by `Stage1Recipe` and read
                         through `source.steps` (RandomResizedCrop + flip drawn up front, files decoded in
                         worker processes, batches normalised and laid out for the model), each batch
                         summed on the device
  reference data path    `torchvision.datasets.ImageFolder` with RandomResizedCrop(224) + flip + ToTensor +
                         Normalize in a `DataLoader(shuffle=True)`, each batch moved to the device and summed
  ours / reference + model   the same loops with a ResNet-50 training step per batch (SGD, cross entropy,
                         bf16 autocast where the hardware has it, channels_last on the CPU as train.py does),
                         over --model-steps steps only: on a CPU a ResNet-50 step at batch 64 takes seconds
  model step alone       the same step on random tensors of the same shape, same number of steps

Warm-up, the same for every row: a rate counts from the moment the first batch is in hand (and, in the
model rows, trained on: worker start, allocator, oneDNN / cuDNN kernels) to the last batch, and the images
after the first; the time to that first batch is reported apart, as "first batch s". Data-path rounds are
interleaved (reference, ours, reference, ...) and the median is reported, as this machine's speed drifts.

  python benchmarks/streaming_throughput.py                 # CPU: about 2 min on 2 idle cores
  python benchmarks/streaming_throughput.py --device cuda --images 6000 --model-steps 40
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import datasets, transforms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.contract.catalog import cifar100_pixels  # noqa: E402
from models.contract.config import (  # noqa: E402
    AugmentConfig,
    FolderDataset,
    LoaderConfig,
    RunConfig,
    Stage1Config,
)
from models.core.backbones import build_classifier  # noqa: E402
from models.core.data import load_dataset  # noqa: E402
from models.core.device import autocast, to_model_layout  # noqa: E402
from models.core.source import source_for  # noqa: E402
from models.core.stages import Stage1Recipe  # noqa: E402
from models.core.train import autocast_dtype  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_SIZE = 224
TEST_PER_CLASS = 5
FEATURE_CHANNELS = 2048  # ResNet-50's; stage 1 draws nothing with it


# ---------------------------------------------------------------------------------------------- the tree

def _write_jpeg(job: tuple[np.ndarray, str, int, int, int]) -> int:
    pixels, path, width, height, quality = job
    image = Image.fromarray(pixels).resize((width, height), Image.BILINEAR)
    image.save(path, "JPEG", quality=quality)
    return os.path.getsize(path)


def build_tree(work: Path, data_root: Path, classes: int, per_class: int, min_side: int, max_side: int,
               quality: int, seed: int) -> tuple[Path, dict]:
    """`work/<name>/{train,test}/<class>/*.jpg`, rebuilt only when its parameters change."""
    params = {"classes": classes, "per_class": per_class, "test_per_class": TEST_PER_CLASS, "min_side": min_side,
              "max_side": max_side, "quality": quality, "seed": seed, "version": 1}
    tree = work / f"jpeg-{classes}x{per_class}-{min_side}-{max_side}-q{quality}-s{seed}"
    marker = tree / "params.json"
    if marker.exists() and json.loads(marker.read_text()).get("params") == params:
        return tree, json.loads(marker.read_text())
    shutil.rmtree(tree, ignore_errors=True)
    rng = np.random.default_rng(seed)
    jobs = []
    for split, per in (("train", per_class), ("test", TEST_PER_CLASS)):
        images, labels, names = cifar100_pixels(data_root, split)
        for c in range(classes):
            folder = tree / split / names[c]
            folder.mkdir(parents=True)
            pool = np.flatnonzero(labels == c)  # past CIFAR's count, its images again at other sizes
            for k in range(per):
                w, h = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
                jobs.append((images[pool[k % len(pool)]], str(folder / f"{k:05d}.jpg"), w, h, quality))
    started = time.perf_counter()
    with Pool(os.cpu_count()) as pool:
        sizes = pool.map(_write_jpeg, jobs, chunksize=32)
    info = {"params": params, "files": len(jobs), "bytes": int(sum(sizes)), "seconds": time.perf_counter() - started}
    marker.write_text(json.dumps(info))
    return tree, info


# ---------------------------------------------------------------------------------------------- the loops

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def our_batches(dataset, device: torch.device, batch: int, workers: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    config = RunConfig(loader=LoaderConfig(mode="streaming", workers=workers))
    source = source_for(dataset, config, device)
    recipe = Stage1Recipe(Stage1Config(batch_size=batch, mixup_alpha=0))
    steps = recipe.draw_epoch(source.train_labels, source.augmentation, FEATURE_CHANNELS,
                              torch.Generator().manual_seed(0), device)
    for (b,) in source.steps([s.requests for s in steps]):
        yield b.images, b.labels


def reference_batches(train_dir: Path, device: torch.device, batch: int,
                      workers: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    transform = transforms.Compose([
        transforms.RandomResizedCrop(IMAGE_SIZE), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    folder = datasets.ImageFolder(str(train_dir), transform=transform)
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(folder, batch_size=batch, shuffle=True, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    for x, y in loader:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


class Model:
    def __init__(self, classes: int, device: torch.device, dtype: torch.dtype | None) -> None:
        torch.manual_seed(0)
        model = build_classifier("resnet50", classes).to(device)
        if device.type == "cpu":
            model = model.to(memory_format=torch.channels_last)  # as train_two_stage
        self.model, self.device, self.dtype = model.train(), device, dtype
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with autocast(self.device, self.dtype):
            loss = F.cross_entropy(self.model(to_model_layout(x, self.device)).float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


class Timed:
    """Images after the first batch, over the seconds from the first batch in hand to the last one done."""

    def __init__(self, first_batch_s: float, images: int, seconds: float) -> None:
        self.first_batch_s, self.images, self.seconds = first_batch_s, images, seconds

    @property
    def rate(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")


def run_loop(batches: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]], device: torch.device,
             model: Model | None = None, steps: int | None = None) -> Timed:
    """Draw batches (at most `steps` + 1); touch each (a sum on the device), or train on it."""
    sink = torch.zeros((), device=device)
    requested = time.perf_counter()
    iterator = batches()
    started = first = None
    images = done = 0
    try:
        for x, y in iterator:
            if model is not None:
                model.step(x, y)
            else:
                sink += x.sum() + y.sum()
            if started is None:
                sync(device)
                started = time.perf_counter()
                first = started - requested
            else:
                images += len(y)
            done += 1
            if steps is not None and done > steps:
                break
        sync(device)
        float(sink)
        return Timed(first or 0.0, images, time.perf_counter() - started if started else 0.0)
    finally:
        iterator.close()  # shuts down the loader's workers before the next row starts its own


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"),
                        help="holds cifar-100-python/ (the source of the pixels)")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "h2t-bench-streaming"),
                        help="where the JPEG tree is built and cached (it is the data root of the dataset)")
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--images", type=int, default=1500, help="training images (split evenly over the classes)")
    parser.add_argument("--min-side", type=int, default=300)
    parser.add_argument("--max-side", type=int, default=500)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--workers", type=int, default=2, help="decoding processes, the same for both data paths")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved epochs of each data-path row (median)")
    parser.add_argument("--model-steps", type=int, default=8,
                        help="timed training steps of each model row (after one untimed step)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads of the main process (default: torch's, the CPU count)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    dtype = autocast_dtype(args.precision, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    per_class = max(1, args.images // args.classes)
    tree, info = build_tree(work, Path(args.data_root), args.classes, per_class, args.min_side, args.max_side,
                            args.quality, seed=0)
    train_dir = tree / "train"

    started = time.perf_counter()
    dataset = load_dataset(FolderDataset(folder=tree.name, image_size=IMAGE_SIZE), work, augment=AugmentConfig(),
                           loader=LoaderConfig(mode="streaming", workers=args.workers))
    load_s, load_rss = time.perf_counter() - started, max_rss_mib()
    classes = dataset.num_classes
    n_train = len(dataset.train)

    ours = lambda: our_batches(dataset, device, args.batch_size, args.workers)  # noqa: E731
    reference = lambda: reference_batches(train_dir, device, args.batch_size, args.workers)  # noqa: E731

    data_rows: dict[str, list[Timed]] = {"reference data path": [], "ours data path": []}
    for _ in range(args.rounds):
        data_rows["reference data path"].append(run_loop(reference, device))
        data_rows["ours data path"].append(run_loop(ours, device))

    x = torch.randn(args.batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, classes, (args.batch_size,), generator=torch.Generator().manual_seed(1))
    x, y = x.to(device), y.to(device)

    def fixed() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield from [(x, y)] * (args.model_steps + 1)

    model_rows = {
        "reference + model": run_loop(reference, device, Model(classes, device, dtype), args.model_steps),
        "ours + model": run_loop(ours, device, Model(classes, device, dtype), args.model_steps),
        "model step alone": run_loop(fixed, device, Model(classes, device, dtype), args.model_steps),
    }

    def median(timings: list[Timed]) -> Timed:
        """The median rate, startup and images of interleaved rounds."""
        rate = statistics.median(t.rate for t in timings)
        images = timings[0].images
        return Timed(statistics.median(t.first_batch_s for t in timings), images, images / rate)

    medians = {name: median(t) for name, t in data_rows.items()}
    ref_data, ref_model = medians["reference data path"].rate, model_rows["reference + model"].rate
    model_alone = model_rows["model step alone"].rate

    print(f"CPUs: {os.cpu_count()} (torch threads {torch.get_num_threads()}), torch {torch.__version__}, "
          f"device {device}{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
          f"precision {dtype or torch.float32}")
    print(f"tree: {tree} ({info['files']} JPEGs, {info['bytes'] / 2**20:.0f} MiB, sides {args.min_side}-"
          f"{args.max_side} px, quality {args.quality}); {n_train} training images in {classes} classes")
    print(f"workers {args.workers}, batch {args.batch_size}, image size {IMAGE_SIZE}; data paths: "
          f"{args.rounds} interleaved epoch(s), median; model rows: {args.model_steps} timed steps after the "
          f"first batch; streaming load {load_s:.1f} s, main-process peak RSS after it {load_rss:.0f} MiB\n")
    header = ("row", "images", "first batch s", "images/s", "vs reference", "vs model alone", "rounds (img/s)")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
    for name, t in medians.items():
        rounds = ", ".join(f"{r.rate:.0f}" for r in data_rows[name])
        print(f"| {name} | {t.images} | {t.first_batch_s:.2f} | {t.rate:.1f} | {t.rate / ref_data:.2f}x | | "
              f"{rounds} |")
    for name, t in model_rows.items():
        vs_ref = f"{t.rate / ref_model:.2f}x" if name != "model step alone" else ""
        print(f"| {name} | {t.images} | {t.first_batch_s:.2f} | {t.rate:.2f} | {vs_ref} | "
              f"{t.rate / model_alone:.2f} | |")
    ours_data = medians["ours data path"].rate
    print(f"\nours data path / reference data path: {ours_data / ref_data:.2f}x (goal >= 1.5x on a CPU); "
          f"ours + model / model alone: {model_rows['ours + model'].rate / model_alone:.2f} (goal >= 0.9 on a GPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
