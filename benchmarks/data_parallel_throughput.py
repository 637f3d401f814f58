"""Stage-1 training throughput (images/s) of one run on 1 rank and on 2 data-parallel ranks.

The same ResNet-32 stage 1 (mixup, batch 128, the run's precision) on a CIFAR-100-LT (IR 100) subset, through
models.core.train.train_epoch:
  1 rank, in process     the worker's path for a run on one device (all of the host's threads)
  1 rank, launched       the same, as a launched rank (what the supervisor adds: nothing inside the epoch)
  2 ranks, launched      models.core.launch: 2 processes of one torch.distributed group (gloo on CPU, NCCL on
                         GPUs), each training its half of every global batch, gradients averaged by DDP
Each row times one epoch after a warm-up epoch (rank 0's clock, the global images of the epoch); rounds are
interleaved and the median of each row is reported, since this machine's speed drifts.

On a CPU the ranks share its cores, so the ratio says what data parallelism costs or gains there, not what
GPUs gain. On a host with N GPUs pass --device cuda --ranks 1 N.

  python benchmarks/data_parallel_throughput.py --data-root ../shared/data
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.contract.config import BuiltinDataset, RunConfig  # noqa: E402
from models.core.backbones import build_classifier  # noqa: E402
from models.core.data import Dataset, ImageSet, load_dataset  # noqa: E402
from models.core.launch import TrainingHooks, launch  # noqa: E402
from models.core.ranks import SINGLE, Ranks  # noqa: E402
from models.core.source import source_for  # noqa: E402
from models.core.stages import Stage1Recipe  # noqa: E402
from models.core.train import autocast_dtype, data_parallel, epoch_generator, train_epoch  # noqa: E402


def cifar_subset(data_root: str, images: int) -> Dataset:
    full = load_dataset(BuiltinDataset(builtin="cifar100", imbalance_factor=0.01), data_root)
    keep = torch.randperm(len(full.train), generator=torch.Generator().manual_seed(0))[:images]
    train = ImageSet(full.train.images[keep].contiguous(), full.train.labels[keep].contiguous())
    return Dataset(full.name, full.class_names, train, full.test, full.mean, full.std)


def stage1_images_per_second(ranks: Ranks, device: torch.device, hooks: TrainingHooks, data_root: str,
                             images: int, config: RunConfig) -> float:
    """One rank's part: a warm-up epoch, then the timed one; rank 0's figure is the run's."""
    dataset = cifar_subset(data_root, images)
    torch.manual_seed(0)
    model = build_classifier(config.backbone, dataset.num_classes).to(device)
    if device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    model.train()
    recipe = Stage1Recipe(config.stage1)
    optimizer = torch.optim.SGD(recipe.trained_parameters(model), lr=0.05, momentum=0.9, weight_decay=2e-4)
    net = data_parallel(recipe.training_module(model), device) if ranks.parallel else model
    source = source_for(dataset, config, device, ranks.world)
    dtype = autocast_dtype(config.precision, device)
    figure = 0.0
    for epoch in range(2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        _, seen = train_epoch(model, source, recipe, optimizer, epoch_generator(0, 1, epoch), dtype, ranks, net)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        figure = seen / (time.perf_counter() - started)
    return figure


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--images", type=int, default=40 * 128, help="training images per epoch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="rank counts to launch")
    args = parser.parse_args()

    config = RunConfig.model_validate({"precision": args.precision, "stage1": {"batch_size": 128}})
    job_args = (args.data_root, args.images, config)
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    rows = {"1 rank, in process": lambda: stage1_images_per_second(SINGLE, device, TrainingHooks(), *job_args)}
    for world in args.ranks:
        label = f"{world} rank{'s' if world > 1 else ''}, launched"
        rows[label] = lambda world=world: launch(world, args.device, stage1_images_per_second, job_args)
    measured: dict[str, list[float]] = {label: [] for label in rows}
    for _ in range(args.rounds):
        for label, measure in rows.items():
            measured[label].append(measure())

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU, {cpus} cores"
    print(f"stage 1, ResNet-32, CIFAR-100-LT subset of {args.images} images, batch 128, mixup, "
          f"precision {args.precision}, {name}; median of {args.rounds} interleaved rounds\n")
    base = statistics.median(measured["1 rank, in process"])
    print(f"| {'row':<22} | {'images/s':>9} | {'vs 1 rank':>9} |")
    print(f"|{'-' * 24}|{'-' * 10}:|{'-' * 10}:|")
    for label, values in measured.items():
        median = statistics.median(values)
        print(f"| {label:<22} | {median:>9.0f} | {median / base:>8.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
