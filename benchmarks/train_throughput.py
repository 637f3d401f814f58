"""Stage-1 training throughput (images/s): our tensor data path vs a reference loop vs the model alone.

All train the same ResNet-32 with the same batch size, optimizer and input mixup on CIFAR-100-LT
(IR 100):
  reference  the loop as commonly written (the official H2T code): torchvision CIFAR-style dataset,
             per-image PIL RandomCrop(32, 4) + flip + ToTensor + Normalize in a DataLoader, fp32, NCHW;
             once more with our precision and memory layout, to separate the data path's share
  ours       models.core.train's epoch loop: uint8 tensors in memory, batch crop/flip/normalise as tensor
             ops, bf16 autocast and channels_last where the hardware has them (precision "auto")
  model      our model step alone, same precision and layout as ours, on pre-made tensors
Rounds are interleaved (reference, ours, model, reference, ...) and the median of each is reported,
since this machine's speed drifts; the ratios come from one run.

  python benchmarks/train_throughput.py --data-root ../shared/data
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.contract.config import BuiltinDataset, RunConfig, Stage1Config  # noqa: E402
from models.core.augment import mix, mixup_lambda  # noqa: E402
from models.core.backbones import build_classifier  # noqa: E402
from models.core.data import CIFAR_MEAN, CIFAR_STD, Dataset, ImageSet, load_dataset  # noqa: E402
from models.core.device import autocast, to_model_layout  # noqa: E402
from models.core.source import source_for  # noqa: E402
from models.core.stages import Stage1Recipe  # noqa: E402
from models.core.train import autocast_dtype, train_epoch  # noqa: E402


class PilCifar(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR100 does per item: HWC uint8 -> PIL -> transform."""

    def __init__(self, images_hwc: np.ndarray, labels: np.ndarray, transform) -> None:
        self.data, self.targets, self.transform = images_hwc, labels.tolist(), transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.data[index])), self.targets[index]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_model(num_classes: int, device: torch.device, channels_last: bool = True):
    torch.manual_seed(0)
    model = build_classifier("resnet32", num_classes).to(device)
    if device.type == "cpu" and channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    config = Stage1Config()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=config.momentum, weight_decay=config.weight_decay)
    return model, optimizer


def step(model, optimizer, x, y, dtype, device, generator, channels_last: bool = True) -> None:
    lam = mixup_lambda(1.0, generator)
    perm = torch.randperm(x.shape[0], generator=generator).to(device)
    with autocast(device, dtype):
        logits = model(mix(to_model_layout(x, device) if channels_last else x, perm, lam)).float()
        loss = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def time_reference(subset: ImageSet, batch: int, workers: int, dtype, device, num_classes: int,
                   channels_last: bool) -> float:
    transform = transforms.Compose([
        transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize(CIFAR_MEAN, CIFAR_STD),
    ])
    dataset = PilCifar(subset.images.permute(0, 2, 3, 1).numpy(), subset.labels.numpy(), transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                                         persistent_workers=False)
    model, optimizer = make_model(num_classes, device, channels_last)
    generator = torch.Generator().manual_seed(0)
    started, seen = time.perf_counter(), 0
    for x, y in loader:
        step(model, optimizer, x.to(device), y.to(device), dtype, device, generator, channels_last)
        seen += len(y)
    synchronize(device)
    return seen / (time.perf_counter() - started)


def time_ours(subset: Dataset, batch: int, dtype, device, num_classes: int) -> float:
    model, optimizer = make_model(num_classes, device)
    source = source_for(subset, RunConfig(), device)
    recipe = Stage1Recipe(Stage1Config(batch_size=batch))
    started = time.perf_counter()
    _, seen = train_epoch(model, source, recipe, optimizer, torch.Generator().manual_seed(0), dtype)
    return seen / (time.perf_counter() - started)


def time_model_only(steps: int, batch: int, dtype, device, num_classes: int) -> float:
    model, optimizer = make_model(num_classes, device)
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(batch, 3, 32, 32, generator=gen).to(device) for _ in range(4)]
    ys = [torch.randint(0, num_classes, (batch,), generator=gen).to(device) for _ in range(4)]
    synchronize(device)
    started = time.perf_counter()
    for i in range(steps):
        step(model, optimizer, xs[i % 4], ys[i % 4], dtype, device, gen)
    synchronize(device)  # a GPU runs behind the host: time the work, not its queueing
    return steps * batch / (time.perf_counter() - started)


def time_model_variant(steps: int, batch: int, dtype, device, num_classes: int, channels_last: bool,
                       compiled: bool) -> float:
    """The model step alone in another memory layout or compiled (torch.compile "reduce-overhead": CUDA graphs
    on a GPU), to measure which pays before it becomes a run setting."""
    model, optimizer = make_model(num_classes, device, channels_last=False)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model, mode="reduce-overhead") if compiled else model
    gen = torch.Generator().manual_seed(0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    xs = [torch.randn(batch, 3, 32, 32, generator=gen).to(device).contiguous(memory_format=layout) for _ in range(4)]
    ys = [torch.randint(0, num_classes, (batch,), generator=gen).to(device) for _ in range(4)]
    for i in range(3):  # compilation and graph capture happen here, not in the timed steps
        step(forward, optimizer, xs[i % 4], ys[i % 4], dtype, device, gen, channels_last=False)
    synchronize(device)
    started = time.perf_counter()
    for i in range(steps):
        step(forward, optimizer, xs[i % 4], ys[i % 4], dtype, device, gen, channels_last=False)
    synchronize(device)
    return steps * batch / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--steps", type=int, default=30, help="training steps per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                        help="DataLoader workers for the reference loop (the official CIFAR configs use 0)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variants", action="store_true",
                        help="also time the model step alone in the other memory layout and under torch.compile")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = autocast_dtype(args.precision, device)
    full = load_dataset(BuiltinDataset(builtin="cifar100", imbalance_factor=0.01), args.data_root)
    n = args.steps * args.batch_size
    keep = torch.randperm(len(full.train), generator=torch.Generator().manual_seed(0))[:n]
    subset_images = ImageSet(full.train.images[keep].contiguous(), full.train.labels[keep].contiguous())
    subset = Dataset(full.name, full.class_names, subset_images, full.test, full.mean, full.std)
    classes = full.num_classes

    candidates = {f"reference: fp32, PIL DataLoader, {w} workers": (lambda w=w: time_reference(
        subset_images, args.batch_size, w, None, device, classes, channels_last=False)) for w in args.workers}
    candidates["reference data path, our precision"] = lambda: time_reference(
        subset_images, args.batch_size, 0, dtype, device, classes, channels_last=True)
    candidates["ours (tensor data path)"] = lambda: time_ours(subset, args.batch_size, dtype, device, classes)
    candidates["model step alone"] = lambda: time_model_only(args.steps, args.batch_size, dtype, device, classes)
    if args.variants:
        other = device.type != "cpu"  # the layout the loop does not use on this device (CPU: channels_last)
        candidates[f"model step alone, {'channels_last' if other else 'NCHW'}"] = lambda: time_model_variant(
            args.steps, args.batch_size, dtype, device, classes, channels_last=other, compiled=False)
        candidates["model step alone, torch.compile"] = lambda: time_model_variant(
            args.steps, args.batch_size, dtype, device, classes, channels_last=device.type == "cpu", compiled=True)

    time_model_only(3, args.batch_size, dtype, device, classes)  # warm-up: allocator, oneDNN kernels
    rates: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(args.rounds):
        for name, run in candidates.items():
            rates[name].append(run())

    medians = {name: statistics.median(v) for name, v in rates.items()}
    ours, model_only = medians["ours (tensor data path)"], medians["model step alone"]
    print(f"stage-1 ResNet-32 training, CIFAR-100-LT, batch {args.batch_size}, {args.steps} steps x "
          f"{args.rounds} rounds, precision {dtype or torch.float32}, device {device}, "
          f"{torch.get_num_threads()} threads\n")
    print(f"| {'loop':<42} | {'img/s (median)':>14} | {'rounds':<24} | {'ours / this':>11} |")
    print(f"|{'-' * 44}|{'-' * 16}|{'-' * 26}|{'-' * 13}|")
    for name, median in medians.items():
        rounds = ", ".join(f"{r:.0f}" for r in rates[name])
        print(f"| {name:<42} | {median:>14.0f} | {rounds:<24} | {ours / median:>11.2f} |")
    as_written = max(v for k, v in medians.items() if k.startswith("reference: fp32"))
    print(f"\nours vs the best reference as commonly written: {ours / as_written:.2f}x "
          f"(goal >= 2x); ours / model alone: {100 * ours / model_only:.0f}% (goal >= 80%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
