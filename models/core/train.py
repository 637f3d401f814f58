"""Two-stage training as functions that report every epoch through a callback.

Stage 1 trains backbone and classifier end to end; stage 2 re-trains the classifier on the frozen
backbone with class-balanced batches, fusing channels of instance-sampled feature maps into them
(H2T) when rho > 0. Both stages run through the same `run_stage` loop, which asks the stage's recipe
(`models.core.stages`) what to train, how to draw an epoch and what a step's loss is.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.contract.config import RunConfig
from models.contract.layout import RunFolder
from models.contract.metrics import DEFAULT_GROUPS, EpochMetrics, EvaluationReport, class_groups, evaluate_predictions
from models.core.augment import normalize
from models.core.backbones import ImageClassifier, build_classifier
from models.core.data import Dataset
from models.core.device import autocast, to_model_layout
from models.core.pretrained import PretrainedReport, WeightSource, initialise_from
from models.core.progress import ProgressCallback, ProgressClock
from models.core.ranks import SINGLE, Ranks, agree, sum_across
from models.core.source import BatchSource, source_for
from models.core.stages import Stage1Recipe, Stage2Recipe, StageRecipe, StepT, sam_perturb, sam_restore


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


def epoch_generator(seed: int, stage: int, epoch: int) -> torch.Generator:
    """Every random draw of an epoch comes from a generator derived from (seed, stage, epoch),
    so resuming at an epoch boundary replays exactly what an uninterrupted run would draw."""
    state = np.random.SeedSequence([seed, stage, epoch]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


@torch.no_grad()
def predict_probs(
    model: ImageClassifier, batches: Iterable[torch.Tensor], mean: tuple[float, ...], std: tuple[float, ...],
    dtype: torch.dtype | None = None,
) -> np.ndarray:
    """Softmax probabilities (float32 numpy) of uint8 image batches, in eval mode."""
    device = next(model.parameters()).device
    mean_t, std_t = torch.tensor(mean, device=device), torch.tensor(std, device=device)
    was_training = model.training
    model.eval()
    out = []
    for images in batches:
        x = normalize(images.to(device), mean_t, std_t)
        with autocast(device, dtype):
            logits = model(to_model_layout(x, device))
        out.append(torch.softmax(logits.float(), dim=1).cpu())
    model.train(was_training)
    return torch.cat(out).numpy()


EVAL_BATCH = 500


def evaluate(
    model: ImageClassifier, dataset: Dataset, source: BatchSource, groups: list[str], dtype: torch.dtype | None
) -> EvaluationReport:
    with closing(source.test_images(EVAL_BATCH)) as batches:  # closed on an error too: no reader left running
        probs = predict_probs(model, batches, dataset.mean, dataset.std, dtype)
    return evaluate_predictions(probs, source.test_labels.numpy(), groups)


def train_epoch(
    model: ImageClassifier, source: BatchSource, recipe: StageRecipe[StepT], optimizer: torch.optim.Optimizer,
    generator: torch.Generator, dtype: torch.dtype | None, ranks: Ranks = SINGLE, net: torch.nn.Module | None = None,
    on_step: Callable[[int, int, int], None] | None = None,
) -> tuple[float, int]:
    """One pass of a stage; returns (mean loss, images seen), both of the whole run (all ranks). The caller
    sets the modes first. `net` is the recipe's training module, wrapped for data-parallel runs; `on_step`
    gets (steps done, steps, images seen) after each step and may raise to stop between steps."""
    net = net if net is not None else recipe.training_module(model)
    steps = recipe.draw_epoch(source.train_labels, source.augmentation, model.feature_channels, generator,
                              source.device)
    # every rank draws the whole epoch and trains its share of each step
    trained = [step.shard(ranks) for step in steps] if ranks.parallel else steps
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    total_loss = torch.zeros((), device=source.device)  # summed on the device: no sync per step
    seen = 0
    with closing(source.steps([step.requests for step in trained])) as loaded:  # closed on an error too
        for done, (step, share, batches) in enumerate(zip(steps, trained, loaded, strict=True), start=1):
            loss = recipe.step_loss(net, share, batches, dtype)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if recipe.sam_rho > 0:  # SAM: the step takes the gradient at the worst point within rho
                kept = sam_perturb(parameters, recipe.sam_rho)
                optimizer.zero_grad(set_to_none=True)
                recipe.step_loss(net, share, batches, dtype).backward()
                sam_restore(parameters, kept)
            optimizer.step()
            recipe.after_step(model)
            total_loss += loss.detach() * (step.size / ranks.world)  # the share's part of the step's sum
            seen += step.size
            if on_step is not None:
                on_step(done, len(steps), seen)
    return float(sum_across(total_loss, ranks)) / max(seen, 1), seen


def _save_atomic(state: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    """Never unpickles arbitrary objects: tensors, numbers, strings, lists and dicts only."""
    return torch.load(path, map_location=device, weights_only=True)


def run_groups(dataset: Dataset, config: RunConfig) -> list[str]:
    """The many/medium/few group of each class, as the run's config defines them (the service and `h2t train`
    fill in the dataset's definition; a config without one gets the count thresholds)."""
    return class_groups(dataset.counts_for_groups(), config.groups or DEFAULT_GROUPS)


@dataclass(frozen=True)
class StageResult:
    history: list[EpochMetrics]
    last_report: EvaluationReport | None  # of the last epoch trained by this call; None if none was


def data_parallel(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`net` under DistributedDataParallel: gradients averaged over the ranks in backward, BatchNorm buffers
    broadcast from rank 0 at each forward."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)


def run_stage(
    model: ImageClassifier, dataset: Dataset, source: BatchSource, config: RunConfig, recipe: StageRecipe[StepT],
    folder: RunFolder, on_epoch: EpochCallback | None = None, dtype: torch.dtype | None = None,
    stop_requested: Callable[[], bool] | None = None, ranks: Ranks = SINGLE,
    on_progress: ProgressCallback | None = None, later_epochs: int = 0,
) -> StageResult:
    """Train one stage to its last epoch, resuming from its checkpoint in `folder` when there is one.

    After each epoch: evaluate, report through `on_epoch` (which may raise TrainingCancelled),
    then checkpoint. Reporting before checkpointing means a crash in between replays the epoch
    and reports it again, never skips a report; consumers key reports by (stage, epoch).

    In a data-parallel run every rank trains its share of each step; rank 0 alone evaluates, reports
    and checkpoints, and its `stop_requested` decides for all ranks.

    `on_progress` gets a StepProgress every few seconds inside an epoch (time estimates count
    `later_epochs` more epochs after this stage's) and may raise TrainingCancelled to stop between steps.
    """
    stage, stage_config = recipe.stage, recipe.config
    checkpoint_path = folder.checkpoint(stage)
    optimizer = torch.optim.SGD(recipe.trained_parameters(model), lr=stage_config.lr,
                                momentum=stage_config.momentum, weight_decay=stage_config.weight_decay)
    groups = run_groups(dataset, config)
    history: list[EpochMetrics] = []
    report = None
    start_epoch = 0
    if checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path, source.device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"].cpu())
        start_epoch = state["epoch"]
        history = [EpochMetrics.model_validate(m) for m in state["history"]]
    net = recipe.training_module(model)  # after trained_parameters: DDP syncs what requires a gradient
    if ranks.parallel:
        net = data_parallel(net, source.device)

    epoch_s = None  # wall time of the last whole epoch (training, evaluation, checkpoint) in this call
    for epoch in range(start_epoch, stage_config.epochs):
        lr = recipe.lr_at(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        recipe.set_modes(model)
        clock = None if on_progress is None else ProgressClock(on_progress, stage, epoch, stage_config.epochs,
                                                               epoch_s, later_epochs)
        started = time.perf_counter()
        loss, seen = train_epoch(model, source, recipe, optimizer, epoch_generator(config.seed, stage, epoch), dtype,
                                 ranks, net, clock.tick if clock is not None else None)
        seconds = time.perf_counter() - started
        if ranks.main:
            report = evaluate(model, dataset, source, groups, dtype)
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
        # rank 0 decides, after its checkpoint, and every rank stops at this same epoch
        if agree(stop_requested is not None and stop_requested(), ranks, source.device):
            raise TrainingInterrupted(f"stopped after epoch {epoch + 1} of stage {stage}, checkpoint saved")
        epoch_s = time.perf_counter() - started
    return StageResult(history, report)


@dataclass(frozen=True)
class TwoStageResult:
    model: ImageClassifier
    stage1: list[EpochMetrics]
    stage2: list[EpochMetrics]
    report: EvaluationReport | None  # the last epoch of stage 2 on the evaluation split; None on ranks but 0
    groups: list[str]
    pretrained: PretrainedReport | None = None  # what this call loaded before a fresh stage 1


def finished_checkpoint(source: RunFolder, stage: int, backbone: str, num_classes: int,
                        device: torch.device | str = "cpu") -> dict:
    """The loaded checkpoint of a completed `stage` in `source`, checked to be a `backbone` for `num_classes`:
    a stage-1 checkpoint a run reuses, or the stage-2 one a finished folder is exported from."""
    path = source.checkpoint(stage)
    if not path.exists():
        raise FileNotFoundError(f"no stage-{stage} checkpoint at {path}")
    state = load_checkpoint(path, device)
    info, done = state["meta"], state["epoch"]
    if done < info["epochs"]:
        raise ValueError(f"stage {stage} in {source.root} stopped at epoch {done} of {info['epochs']}")
    if info["backbone"] != backbone or info["num_classes"] != num_classes:
        raise ValueError(f"stage {stage} in {source.root} is a {info['backbone']} for {info['num_classes']} "
                         f"classes, this run needs a {backbone} for {num_classes}")
    return state


def train_two_stage(
    dataset: Dataset, config: RunConfig, folder: RunFolder, device: torch.device | None = None,
    on_epoch: EpochCallback | None = None, stage1_from: RunFolder | None = None,
    stop_requested: Callable[[], bool] | None = None, weights: WeightSource | None = None,
    ranks: Ranks = SINGLE, on_progress: ProgressCallback | None = None,
) -> TwoStageResult:
    """Stage 1 (or a finished one reused from `stage1_from`), then stage 2; resumable in `folder`.

    A run with `pretrained` weights loads them (found through `weights`) into the freshly built model
    only when stage 1 starts from scratch: a stage-1 checkpoint to resume from, or a reused stage 1,
    wins, so a resumed run ends exactly as an uninterrupted one.

    In a data-parallel run (`ranks`, inside a process group that `models.core.launch` set up) every rank
    calls this; with `sync_batchnorm` BatchNorm layers normalise over the global batch while training."""
    device = device or resolve_device()
    synced = ranks.parallel and config.sync_batchnorm
    if synced and device.type != "cuda":
        raise ValueError("sync_batchnorm needs CUDA devices (torch's SyncBatchNorm has no CPU implementation); "
                         "turn it off to train on CPU processes")
    dtype = autocast_dtype(config.precision, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    folder.create()

    torch.manual_seed(config.seed)
    model = build_classifier(config.backbone, dataset.num_classes).to(device)
    if device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    if synced:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same parameters and state_dict keys
    source = source_for(dataset, config, device, ranks.world)
    stage1, stage2 = Stage1Recipe(config.stage1, tuple(dataset.train_counts())), Stage2Recipe(config.stage2)
    pretrained = None
    if config.pretrained is not None and stage1_from is None and not folder.checkpoint(stage1.stage).exists():
        pretrained = initialise_from(model, config.pretrained, weights or WeightSource())

    if stage1_from is not None:
        state = finished_checkpoint(stage1_from, Stage1Recipe.stage, config.backbone, dataset.num_classes, device)
        model.load_state_dict(state["model"])
        stage1_history = [EpochMetrics.model_validate(m) for m in state["history"]]
    else:
        stage1_history = run_stage(model, dataset, source, config, stage1, folder, on_epoch, dtype,
                                   stop_requested, ranks, on_progress, later_epochs=config.stage2.epochs).history

    if not folder.checkpoint(stage2.stage).exists():
        # stage 2 starts from the stage-1 weights (backbone and classifier) of the final stage-1 epoch
        stage1_folder = stage1_from if stage1_from is not None else folder
        model.load_state_dict(load_checkpoint(stage1_folder.checkpoint(stage1.stage), device)["model"])
    stage2_result = run_stage(model, dataset, source, config, stage2, folder, on_epoch, dtype, stop_requested,
                              ranks, on_progress)

    if synced:  # what is exported and served is the plain model
        plain = build_classifier(config.backbone, dataset.num_classes).to(device)
        plain.load_state_dict(model.state_dict())
        model = plain
    groups = run_groups(dataset, config)
    report = None
    if ranks.main:  # the last epoch's evaluation, unless this call resumed a stage 2 that had already finished
        report = stage2_result.last_report or evaluate(model, dataset, source, groups, dtype)
    return TwoStageResult(model, stage1_history, stage2_result.history, report, groups, pretrained)
