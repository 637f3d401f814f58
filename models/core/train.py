"""Two-stage training as functions that report every epoch through a callback.

Stage 1 trains backbone and classifier end to end; stage 2 re-trains the classifier on the frozen
backbone with class-balanced batches, fusing channels of instance-sampled feature maps into them
(H2T) when rho > 0. Both stages run through the same `run_stage` loop.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from models.contract.config import AugmentConfig, RunConfig, Stage1Config, Stage2Config
from models.contract.metrics import EpochMetrics, EvaluationReport, class_groups, evaluate_predictions
from models.core.augment import CropFlip, crop_flip, mix, mixup_lambda, normalize
from models.core.backbones import ImageClassifier, build_classifier
from models.core.data import Dataset
from models.core.h2t import class_balanced_indices, fuse_channels, fusion_channels

Stage = Literal[1, 2]
CHECKPOINT_NAME = "checkpoint.pt"


class TrainingCancelled(Exception):
    """Raised by an epoch callback to stop training; the last checkpoint stays valid for a resume."""


class TrainingInterrupted(Exception):
    """Training stopped right after a checkpoint because `stop_requested` said so (e.g. SIGTERM);
    running the same call again resumes from that checkpoint."""


EpochCallback = Callable[[EpochMetrics], None]


def resolve_device(requested: str | None = None) -> torch.device:
    """CUDA when present, else CPU, unless a device is named."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    return False


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting, or None for plain fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        if not bf16_supported(device):
            raise ValueError(f"precision 'bf16' requested but {device} has no bf16 support; use 'auto' or 'fp32'")
        return torch.bfloat16
    if precision == "auto":
        return torch.bfloat16 if bf16_supported(device) else None
    raise ValueError(f"unknown precision {precision!r}")


def lr_at(config: Stage1Config | Stage2Config, epoch: int) -> float:
    """Learning rate for a 0-based epoch; a pure function of the epoch, as in the official code."""
    if isinstance(config, Stage2Config):
        return 0.5 * config.lr * (1.0 + math.cos(math.pi * epoch / config.epochs))
    e = epoch + 1
    if e <= config.warmup_epochs:
        return config.lr * e / config.warmup_epochs
    if config.schedule == "cosine":
        span = max(config.epochs - config.warmup_epochs, 1)
        return 0.5 * config.lr * (1.0 + math.cos(math.pi * (e - 1 - config.warmup_epochs) / span))
    return config.lr * config.gamma ** sum(e > m for m in config.milestones)


def epoch_generator(seed: int, stage: int, epoch: int) -> torch.Generator:
    """Every random draw of an epoch comes from a generator derived from (seed, stage, epoch),
    so resuming at an epoch boundary replays exactly what an uninterrupted run would draw."""
    state = np.random.SeedSequence([seed, stage, epoch]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


@dataclass(frozen=True)
class DeviceData:
    """A dataset's tensors moved to the training device once."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    padding: int

    @classmethod
    def from_dataset(cls, data: Dataset, device: torch.device) -> DeviceData:
        return cls(
            train_images=data.train.images.to(device), train_labels=data.train.labels.to(device),
            test_images=data.test.images.to(device), test_labels=data.test.labels.to(device),
            mean=torch.tensor(data.mean, device=device), std=torch.tensor(data.std, device=device),
            padding=max(1, data.image_size // 8),  # 4 for 32x32 images, as RandomCrop(32, padding=4)
        )

    def augmented(self, idx: torch.Tensor, draws: CropFlip) -> torch.Tensor:
        return normalize(crop_flip(self.train_images[idx], self.padding, draws), self.mean, self.std)


def _to_model_layout(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cpu" else x


def _autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


@torch.no_grad()
def predict_probs(
    model: ImageClassifier, images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
    dtype: torch.dtype | None = None, batch_size: int = 1000,
) -> np.ndarray:
    """Softmax probabilities (float32 numpy) of uint8 images, in eval mode."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = normalize(images[start:start + batch_size].to(device), mean, std)
        with _autocast(device, dtype):
            logits = model(_to_model_layout(x, device))
        out.append(torch.softmax(logits.float(), dim=1).cpu())
    model.train(was_training)
    return torch.cat(out).numpy()


def evaluate(
    model: ImageClassifier, data: DeviceData, groups: list[str], dtype: torch.dtype | None
) -> EvaluationReport:
    probs = predict_probs(model, data.test_images, data.mean, data.std, dtype)
    return evaluate_predictions(probs, data.test_labels.cpu().numpy(), groups)


@dataclass(frozen=True)
class EpochDraws:
    """Every random draw of one epoch, made up front on the CPU and moved to the device at once,
    so the step loop never waits on a host-to-device copy."""

    instance: list[torch.Tensor]  # shuffled indices per batch; stage 1's batches, stage 2's fusing branch
    instance_crops: list[CropFlip]
    balanced: list[torch.Tensor] | None  # stage 2: class-balanced indices per batch (the fused branch)
    balanced_crops: list[CropFlip] | None
    mixup_lams: list[float]  # stage 1 with mixup
    mixup_perms: list[torch.Tensor]
    fusion: list[torch.Tensor]  # stage 2 with rho > 0: fused channel indices per batch


def draw_epoch(
    labels: torch.Tensor, config: Stage1Config | Stage2Config, augment: AugmentConfig, padding: int,
    feature_channels: int, generator: torch.Generator, device: torch.device,
) -> EpochDraws:
    n = labels.shape[0]
    order = torch.randperm(n, generator=generator)
    sizes = [len(b) for b in order.split(config.batch_size)]  # the last batch may be smaller: no drop_last
    def crops() -> CropFlip:
        return CropFlip.draw(n, padding, generator, augment.random_crop, augment.horizontal_flip)

    instance_crops = crops()
    balanced = balanced_crops = None
    lams: list[float] = []
    perms: list[torch.Tensor] = []
    fusion: list[torch.Tensor] = []
    if isinstance(config, Stage2Config):
        balanced_idx = class_balanced_indices(labels.cpu(), n, generator)
        balanced = list(balanced_idx.to(device).split(sizes))
        balanced_crops = crops().to(device).split(sizes)
        if config.fusion_ratio > 0:
            fusion = [fusion_channels(feature_channels, config.fusion_ratio, generator).to(device) for _ in sizes]
    elif config.mixup_alpha > 0:
        lams = [mixup_lambda(config.mixup_alpha, generator) for _ in sizes]
        perms = [torch.randperm(size, generator=generator).to(device) for size in sizes]
    return EpochDraws(list(order.to(device).split(sizes)), instance_crops.to(device).split(sizes),
                      balanced, balanced_crops, lams, perms, fusion)


def _train_epoch(
    model: ImageClassifier, data: DeviceData, config: Stage1Config | Stage2Config, augment: AugmentConfig,
    stage: Stage, optimizer: torch.optim.Optimizer, generator: torch.Generator, dtype: torch.dtype | None,
) -> tuple[float, int]:
    """One pass; returns (mean loss, images seen). Mode (train/eval per part) is set by the caller."""
    device = data.train_images.device
    draws = draw_epoch(data.train_labels, config, augment, data.padding, model.feature_channels, generator, device)
    total_loss = torch.zeros((), device=device)
    seen = 0
    for i, instance_idx in enumerate(draws.instance):
        if stage == 1:
            x = _to_model_layout(data.augmented(instance_idx, draws.instance_crops[i]), device)
            y = data.train_labels[instance_idx]
            with _autocast(device, dtype):
                if draws.mixup_lams:
                    lam, perm = draws.mixup_lams[i], draws.mixup_perms[i]
                    logits = model(mix(x, perm, lam)).float()
                    loss = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])
                else:
                    loss = F.cross_entropy(model(x).float(), y)
        else:
            # the fused branch x1 is class-balanced and gives the labels; the instance batch is x2
            fused_idx = draws.balanced[i]
            x1 = _to_model_layout(data.augmented(fused_idx, draws.balanced_crops[i]), device)
            y = data.train_labels[fused_idx]
            with torch.no_grad(), _autocast(device, dtype):
                maps = model.forward_features(x1)
                if draws.fusion:
                    x2 = _to_model_layout(data.augmented(instance_idx, draws.instance_crops[i]), device)
                    maps = fuse_channels(maps, model.forward_features(x2), draws.fusion[i])
            with _autocast(device, dtype):
                loss = F.cross_entropy(model.forward_head(maps).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.detach() * len(instance_idx)
        seen += len(instance_idx)
    return float(total_loss) / max(seen, 1), seen


def _set_modes(model: ImageClassifier, stage: Stage, shift_bn: bool) -> None:
    model.train()
    if stage == 2 and not shift_bn:
        model.backbone.eval()  # frozen BatchNorm statistics


def _save_atomic(state: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    """Never unpickles arbitrary objects: tensors, numbers, strings, lists and dicts only."""
    return torch.load(path, map_location=device, weights_only=True)


def run_groups(dataset: Dataset, config: RunConfig) -> list[str]:
    """The many/medium/few group of each class, as the run's config defines them."""
    return class_groups(dataset.train_counts(), config.groups.many_threshold, config.groups.few_threshold,
                        config.groups.slices)


@dataclass(frozen=True)
class StageResult:
    history: list[EpochMetrics]
    last_report: EvaluationReport | None  # of the last epoch trained by this call; None if none was


def run_stage(
    model: ImageClassifier, dataset: Dataset, data: DeviceData, config: RunConfig, stage: Stage,
    checkpoint_path: Path, on_epoch: EpochCallback | None = None, dtype: torch.dtype | None = None,
    stop_requested: Callable[[], bool] | None = None,
) -> StageResult:
    """Train one stage to its last epoch, resuming from `checkpoint_path` when it exists.

    After each epoch: evaluate, report through `on_epoch` (which may raise TrainingCancelled),
    then checkpoint. Reporting before checkpointing means a crash in between replays the epoch
    and reports it again, never skips a report; consumers key reports by (stage, epoch).
    """
    stage_config = config.stage1 if stage == 1 else config.stage2
    params = model.parameters() if stage == 1 else model.head.parameters()
    if stage == 2:
        model.backbone.requires_grad_(False)
    optimizer = torch.optim.SGD(params, lr=stage_config.lr, momentum=stage_config.momentum,
                                weight_decay=stage_config.weight_decay)
    groups = run_groups(dataset, config)
    history: list[EpochMetrics] = []
    report = None
    start_epoch = 0
    if checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path, data.train_images.device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"].cpu())
        start_epoch = state["epoch"]
        history = [EpochMetrics(**m) for m in state["history"]]

    shift_bn = isinstance(stage_config, Stage2Config) and stage_config.shift_bn
    for epoch in range(start_epoch, stage_config.epochs):
        lr = lr_at(stage_config, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        _set_modes(model, stage, shift_bn)
        started = time.perf_counter()
        loss, seen = _train_epoch(model, data, stage_config, config.augment, stage, optimizer,
                                  epoch_generator(config.seed, stage, epoch), dtype)
        seconds = time.perf_counter() - started
        report = evaluate(model, data, groups, dtype)
        g = report.groups
        metrics = EpochMetrics(
            stage=stage, epoch=epoch + 1, epochs=stage_config.epochs, loss=loss, lr=lr, top1=report.top1,
            many=g["many"].accuracy, medium=g["medium"].accuracy, few=g["few"].accuracy,
            ece=g["overall"].ece, ece_many=g["many"].ece, ece_medium=g["medium"].ece, ece_few=g["few"].ece,
            train_seconds=seconds, images_per_second=seen / seconds if seconds > 0 else 0.0,
        )
        if on_epoch is not None:
            on_epoch(metrics)
        history.append(metrics)
        _save_atomic({
            "epoch": epoch + 1,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "history": [m.model_dump() for m in history],
            "meta": {"backbone": config.backbone, "num_classes": dataset.num_classes, "dataset": dataset.name,
                     "stage": stage, "epochs": stage_config.epochs},
        }, checkpoint_path)
        if stop_requested is not None and stop_requested():
            raise TrainingInterrupted(f"stopped after epoch {epoch + 1} of stage {stage}, checkpoint saved")
    return StageResult(history, report)


@dataclass(frozen=True)
class TwoStageResult:
    model: ImageClassifier
    stage1: list[EpochMetrics]
    stage2: list[EpochMetrics]
    report: EvaluationReport  # the last epoch of stage 2 on the evaluation split
    groups: list[str]


def finished_stage1(stage1_dir: Path, backbone: str, num_classes: int) -> Path:
    """The checkpoint of a completed stage 1 in `stage1_dir`, checked to fit this run."""
    path = stage1_dir / "stage1" / CHECKPOINT_NAME
    if not path.exists():
        raise FileNotFoundError(f"no stage-1 checkpoint at {path}")
    meta = load_checkpoint(path)
    info, done = meta["meta"], meta["epoch"]
    if done < info["epochs"]:
        raise ValueError(f"stage 1 in {stage1_dir} stopped at epoch {done} of {info['epochs']}")
    if info["backbone"] != backbone or info["num_classes"] != num_classes:
        raise ValueError(f"stage 1 in {stage1_dir} is a {info['backbone']} for {info['num_classes']} classes, "
                         f"this run needs a {backbone} for {num_classes}")
    return path


def train_two_stage(
    dataset: Dataset, config: RunConfig, out_dir: Path, device: torch.device | None = None,
    on_epoch: EpochCallback | None = None, stage1_from: Path | None = None,
    stop_requested: Callable[[], bool] | None = None,
) -> TwoStageResult:
    """Stage 1 (or a finished one reused from `stage1_from`), then stage 2; resumable in `out_dir`."""
    device = device or resolve_device()
    dtype = autocast_dtype(config.precision, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "stage1").mkdir(exist_ok=True)
    (out_dir / "stage2").mkdir(exist_ok=True)

    torch.manual_seed(config.seed)
    model = build_classifier(config.backbone, dataset.num_classes).to(device)
    if device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    data = DeviceData.from_dataset(dataset, device)

    if stage1_from is not None:
        source = finished_stage1(stage1_from, config.backbone, dataset.num_classes)
        state = load_checkpoint(source, device)
        model.load_state_dict(state["model"])
        stage1 = [EpochMetrics(**m) for m in state["history"]]
    else:
        stage1 = run_stage(model, dataset, data, config, 1, out_dir / "stage1" / CHECKPOINT_NAME, on_epoch, dtype,
                           stop_requested).history

    stage2_path = out_dir / "stage2" / CHECKPOINT_NAME
    if not stage2_path.exists():
        # stage 2 starts from the stage-1 weights (backbone and classifier) of the final stage-1 epoch
        source = stage1_from if stage1_from is not None else out_dir
        model.load_state_dict(load_checkpoint(source / "stage1" / CHECKPOINT_NAME, device)["model"])
    stage2 = run_stage(model, dataset, data, config, 2, stage2_path, on_epoch, dtype, stop_requested)

    groups = run_groups(dataset, config)
    # the last epoch's evaluation, unless this call resumed a stage 2 that had already finished
    report = stage2.last_report or evaluate(model, data, groups, dtype)
    return TwoStageResult(model, stage1, stage2.history, report, groups)
