"""Each training stage's recipe in one place: the parameters it trains, the modes of the model's
parts, its learning rate per epoch, its random draws per epoch and its step loss.

`models.core.train.run_stage` runs any recipe through one loop, so a new stage-1 loss, augmentation
or stage-2 variant is a change to its recipe here. Every draw of an epoch is made up front from the
epoch's generator; a step names the images it needs as requests (indices and augmentation draws), which
the run's batch source (`models.core.source`) turns into batches, from memory or from files alike. The
ORDER of the draws fixes what a seed trains: reordering them changes every result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar, Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from models.contract.config import Stage1Config, Stage2Config
from models.contract.temperature import class_log_prior
from models.core.augment import (
    Augmentation,
    CutoutDraws,
    Draws,
    ExtraDraws,
    PolicyDraws,
    mix,
    mixup_lambda,
    with_extras,
)
from models.core.backbones import ImageClassifier
from models.core.device import autocast
from models.core.h2t import class_balanced_indices, fuse_channels, fusion_channels
from models.core.ranks import Ranks, shard_positions
from models.core.source import Batch, ImageRequest


class Step(Protocol):
    @property
    def size(self) -> int:
        """Images in the step, the weight of its loss in the epoch's mean."""
        ...

    @property
    def requests(self) -> list[ImageRequest]:
        """The images the step trains on, one batch each, in the order `step_loss` receives them."""
        ...

    def shard(self: StepT, ranks: Ranks) -> StepT:
        """This rank's share of the step in a data-parallel run; its loss sums over the share and divides
        by the whole step's size, so the ranks' averaged gradient is the one-device gradient."""
        ...


StepT = TypeVar("StepT", bound=Step)


class StageRecipe(Protocol[StepT]):
    """What `run_stage` asks of a stage; each stage's answers live in its class below."""

    stage: ClassVar[int]  # names the stage in checkpoints, metrics and the epoch generator's seed

    @property
    def config(self) -> Stage1Config | Stage2Config: ...

    def trained_parameters(self, model: ImageClassifier) -> list[nn.Parameter]: ...

    def training_module(self, model: ImageClassifier) -> nn.Module:
        """What a step calls: one module, so DistributedDataParallel can wrap it in a data-parallel run."""
        ...

    def set_modes(self, model: ImageClassifier) -> None: ...

    def lr_at(self, epoch: int) -> float: ...

    def draw_epoch(self, labels: torch.Tensor, augmentation: Augmentation, feature_channels: int,
                   generator: torch.Generator, device: torch.device) -> list[StepT]: ...

    def step_loss(self, net: nn.Module, step: StepT, batches: list[Batch],
                  dtype: torch.dtype | None) -> torch.Tensor:
        """The loss of a step (or of a rank's share of it) through `training_module`'s `net`."""
        ...

    @property
    def sam_rho(self) -> float:
        """The radius of sharpness-aware minimisation's weight perturbation; 0: a plain optimizer step."""
        ...

    def after_step(self, model: ImageClassifier) -> None:
        """Called after each optimizer step (a projection of the weights, say)."""
        ...


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, loss_scale: float | None) -> torch.Tensor:
    """The mean over a whole step; over a rank's share of it, the sum times `loss_scale`
    (devices / step size), which the ranks' gradient averaging turns into the whole step's mean."""
    if loss_scale is None:
        return F.cross_entropy(logits, labels)
    return F.cross_entropy(logits, labels, reduction="sum") * loss_scale


def logit_adjusted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, log_prior: torch.Tensor, tau: float,
                                 loss_scale: float | None) -> torch.Tensor:
    """Cross-entropy of `logits + tau * log_prior` (Menon et al., ICLR 2021): training pushes the plain logits
    towards a class-balanced decision; with tau 1 it is the balanced softmax (Ren et al., NeurIPS 2020)."""
    return cross_entropy(logits + tau * log_prior, labels, loss_scale)


def log_prior(class_counts: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """`class_log_prior` on the training device."""
    return torch.from_numpy(class_log_prior(class_counts)).to(device)


def sam_perturb(parameters: list[nn.Parameter], rho: float) -> list[torch.Tensor | None]:
    """Sharpness-aware minimisation's ascent (Foret et al., ICLR 2021): move each parameter by
    rho * g / ||g|| (g: the current gradients, the norm over all of them); returns the weights as they were,
    for `sam_restore` (kept rather than subtracted again, so the restore is exact)."""
    grads = [p.grad for p in parameters]
    norm = torch.norm(torch.stack([g.detach().norm(2) for g in grads if g is not None]), 2)
    scale = rho / (norm + 1e-12)
    kept: list[torch.Tensor | None] = []
    with torch.no_grad():
        for p, g in zip(parameters, grads, strict=True):
            kept.append(None if g is None else p.detach().clone())
            if g is not None:
                p.add_(g * scale)
    return kept


def sam_restore(parameters: list[nn.Parameter], kept: list[torch.Tensor | None]) -> None:
    """Undo `sam_perturb`: the gradients computed meanwhile (at the perturbed point) are what SAM steps with."""
    with torch.no_grad():
        for p, weights in zip(parameters, kept, strict=True):
            if weights is not None:
                p.copy_(weights)


def cap_row_norms(weight: torch.Tensor, max_norm: float) -> None:
    """Scale down, in place, each row (a class's weight vector) whose L2 norm exceeds `max_norm` (MaxNorm's
    projection, Alshammari et al., CVPR 2022)."""
    with torch.no_grad():
        norms = weight.norm(dim=1, keepdim=True)
        weight.mul_(torch.clamp(max_norm / norms.clamp_min(1e-12), max=1.0))


def _loss_scale(size: int, ranks: Ranks) -> float:
    return ranks.world / size


@dataclass(frozen=True)
class Shuffle:
    """The draws every epoch starts with: a shuffle of the training set and a crop/flip per image."""

    order: torch.Tensor  # a permutation of the training set, on the CPU
    sizes: list[int]  # batch sizes; the last batch may be smaller (no drop_last)
    crops: Draws

    @classmethod
    def draw(cls, n: int, batch_size: int, augmentation: Augmentation, generator: torch.Generator) -> Shuffle:
        order = torch.randperm(n, generator=generator)
        sizes = [len(b) for b in order.split(batch_size)]
        return cls(order, sizes, augmentation.draw(n, generator))

    def batches(self) -> list[ImageRequest]:
        """Per batch, its indices and augmentation draws."""
        return list(zip(self.order.split(self.sizes), self.crops.split(self.sizes), strict=True))


@dataclass(frozen=True)
class Mixup:
    lam: float
    perm: torch.Tensor  # each image is mixed with the image at this position of the batch


@dataclass(frozen=True)
class Stage1Step:
    indices: torch.Tensor  # into the training set
    crops: Draws
    mixup: Mixup | None  # None without mixup
    # a rank's share only: the images its images are mixed with (from anywhere in the global batch),
    # read as a second batch, and the loss scale of `cross_entropy`
    partners: ImageRequest | None = None
    loss_scale: float | None = None

    @property
    def size(self) -> int:
        return len(self.indices)

    @property
    def requests(self) -> list[ImageRequest]:
        return [(self.indices, self.crops)] + ([self.partners] if self.partners is not None else [])

    def shard(self, ranks: Ranks) -> Stage1Step:
        mine = shard_positions(self.size, ranks)
        partners = None
        if self.mixup is not None:
            theirs = self.mixup.perm.cpu()[mine]
            partners = (self.indices[theirs], self.crops.take(theirs))
        return Stage1Step(self.indices[mine], self.crops.take(mine), self.mixup, partners,
                          _loss_scale(self.size, ranks))


@dataclass(frozen=True)
class Stage1Recipe:
    """Backbone and classifier trained end to end with cross-entropy (or a logit-adjusted loss), with input
    mixup when alpha > 0, an augmentation policy and Cutout after the crop when configured, and SAM."""

    config: Stage1Config
    class_counts: tuple[int, ...] = ()  # of the training split: the prior of the logit-adjusted losses
    stage: ClassVar[int] = 1

    def __post_init__(self) -> None:
        if self.config.loss != "ce" and not self.class_counts:
            raise ValueError(f"stage-1 loss {self.config.loss!r} needs the training split's class counts")

    @property
    def sam_rho(self) -> float:
        return self.config.sam_rho

    def after_step(self, model: ImageClassifier) -> None:
        pass

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, loss_scale: float | None) -> torch.Tensor:
        c = self.config
        if c.loss == "ce":
            return cross_entropy(logits, labels, loss_scale)
        tau = 1.0 if c.loss == "balanced_softmax" else c.logit_adjust_tau
        return logit_adjusted_cross_entropy(logits, labels, log_prior(self.class_counts, logits.device), tau,
                                            loss_scale)

    def draw_extras(self, n: int, generator: torch.Generator) -> tuple[ExtraDraws, ...]:
        """The augmentation after the crop, per image of the epoch: drawn after everything else of the epoch,
        and only when configured, so a run without it draws exactly what it drew before it existed."""
        c = self.config
        extras: list[ExtraDraws] = []
        if c.augment_policy != "none":
            extras.append(PolicyDraws.draw(n, c.augment_policy, generator, c.randaugment_ops,
                                           c.randaugment_magnitude))
        if c.cutout > 0:
            extras.append(CutoutDraws.draw(n, c.cutout, generator))
        return tuple(extras)

    def trained_parameters(self, model: ImageClassifier) -> list[nn.Parameter]:
        return list(model.parameters())

    def training_module(self, model: ImageClassifier) -> nn.Module:
        return model

    def set_modes(self, model: ImageClassifier) -> None:
        model.train()

    def lr_at(self, epoch: int) -> float:
        """Linear warm-up, then multistep or cosine; a pure function of the 0-based epoch, as in the
        official code, so a resumed run uses the same rates."""
        c = self.config
        e = epoch + 1
        if e <= c.warmup_epochs:
            return c.lr * e / c.warmup_epochs
        if c.schedule == "cosine":
            span = max(c.epochs - c.warmup_epochs, 1)
            return 0.5 * c.lr * (1.0 + math.cos(math.pi * (e - 1 - c.warmup_epochs) / span))
        return c.lr * c.gamma ** sum(e > m for m in c.milestones)

    def draw_epoch(self, labels: torch.Tensor, augmentation: Augmentation, feature_channels: int,
                   generator: torch.Generator, device: torch.device) -> list[Stage1Step]:
        shuffle = Shuffle.draw(labels.shape[0], self.config.batch_size, augmentation, generator)
        mixups: list[Mixup | None] = [None] * len(shuffle.sizes)
        if self.config.mixup_alpha > 0:
            # every lambda first, then every permutation
            lams = [mixup_lambda(self.config.mixup_alpha, generator) for _ in shuffle.sizes]
            perms = [torch.randperm(size, generator=generator).to(device) for size in shuffle.sizes]
            mixups = [Mixup(lam, perm) for lam, perm in zip(lams, perms, strict=True)]
        extras = self.draw_extras(labels.shape[0], generator)
        if extras:
            shuffle = replace(shuffle, crops=with_extras(shuffle.crops, extras))
        return [Stage1Step(idx, crops, m) for (idx, crops), m in zip(shuffle.batches(), mixups, strict=True)]

    def step_loss(self, net: nn.Module, step: Stage1Step, batches: list[Batch],
                  dtype: torch.dtype | None) -> torch.Tensor:
        x, y = batches[0].images, batches[0].labels
        scale = step.loss_scale
        with autocast(x.device, dtype):
            if step.mixup is None:
                return self.loss(net(x).float(), y, scale)
            lam = step.mixup.lam
            if step.partners is None:  # the whole batch: partners are a permutation of it
                mixed, y_partner = mix(x, step.mixup.perm, lam), y[step.mixup.perm]
            else:  # a rank's share: the same sums, with partners read as images of their own
                mixed, y_partner = lam * x + (1.0 - lam) * batches[1].images, batches[1].labels
            logits = net(mixed).float()
            return lam * self.loss(logits, y, scale) + (1 - lam) * self.loss(logits, y_partner, scale)


@dataclass(frozen=True)
class Fusion:
    """H2T's fusing branch x2 of a step: instance-sampled images whose `channels` replace x1's."""

    indices: torch.Tensor
    crops: Draws
    channels: torch.Tensor  # one channel subset for the whole batch, as in the official code


@dataclass(frozen=True)
class Stage2Step:
    indices: torch.Tensor  # class-balanced: the fused branch x1, which gives the labels
    crops: Draws
    fusion: Fusion | None  # None for cRT/DR (no fusion)
    loss_scale: float | None = None  # a rank's share only: the scale of `cross_entropy`

    @property
    def size(self) -> int:
        return len(self.indices)

    @property
    def requests(self) -> list[ImageRequest]:
        x1 = (self.indices, self.crops)
        return [x1] if self.fusion is None else [x1, (self.fusion.indices, self.fusion.crops)]

    def shard(self, ranks: Ranks) -> Stage2Step:
        # x1's image i is fused with x2's image i: both branches keep the same positions, and every rank
        # fuses the same channel subset
        mine = shard_positions(self.size, ranks)
        fusion = None if self.fusion is None else replace(
            self.fusion, indices=self.fusion.indices[mine], crops=self.fusion.crops.take(mine))
        return Stage2Step(self.indices[mine], self.crops.take(mine), fusion, _loss_scale(self.size, ranks))


class FusedHead(nn.Module):
    """Stage 2's step as one module: the frozen backbone's feature maps of x1, with H2T's channels fused
    in from x2's, then the classifier's logits. Only the head keeps a graph."""

    def __init__(self, model: ImageClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, x1: torch.Tensor, x2: torch.Tensor | None = None,
                channels: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():  # the backbone is frozen: keep no graph of it
            maps = self.model.forward_features(x1)
            if x2 is not None:
                maps = fuse_channels(maps, self.model.forward_features(x2), channels)
        return self.model.forward_head(maps)


@dataclass(frozen=True)
class Stage2Recipe:
    """The classifier re-trained on the frozen backbone with class-balanced batches and plain CE,
    fusing channels of instance-sampled feature maps into them (H2T) when the fusion ratio is > 0, and its
    class weight vectors capped after each step (MaxNorm) when configured."""

    config: Stage2Config
    stage: ClassVar[int] = 2
    sam_rho: ClassVar[float] = 0.0

    def after_step(self, model: ImageClassifier) -> None:
        if self.config.max_norm is not None:
            cap_row_norms(model.head.fc.weight, self.config.max_norm)

    def trained_parameters(self, model: ImageClassifier) -> list[nn.Parameter]:
        model.backbone.requires_grad_(False)  # frozen: no gradient is even computed for it
        return list(model.head.parameters())

    def training_module(self, model: ImageClassifier) -> nn.Module:
        return FusedHead(model)

    def set_modes(self, model: ImageClassifier) -> None:
        model.train()
        if not self.config.shift_bn:
            model.backbone.eval()  # BatchNorm keeps stage 1's running statistics

    def lr_at(self, epoch: int) -> float:
        """Per-epoch cosine decay from the peak at epoch 0."""
        return 0.5 * self.config.lr * (1.0 + math.cos(math.pi * epoch / self.config.epochs))

    def draw_epoch(self, labels: torch.Tensor, augmentation: Augmentation, feature_channels: int,
                   generator: torch.Generator, device: torch.device) -> list[Stage2Step]:
        n = labels.shape[0]
        # the instance shuffle is drawn even without fusion, so rho 0 and rho > 0 see the same x1
        shuffle = Shuffle.draw(n, self.config.batch_size, augmentation, generator)
        balanced = class_balanced_indices(labels.cpu(), n, generator).split(shuffle.sizes)
        balanced_crops = augmentation.draw(n, generator).split(shuffle.sizes)
        fusions: list[Fusion | None] = [None] * len(shuffle.sizes)
        rho = self.config.fusion_ratio
        if rho > 0:
            channels = [fusion_channels(feature_channels, rho, generator).to(device) for _ in shuffle.sizes]
            instances = shuffle.batches()
            fusions = [Fusion(idx, crops, ch) for (idx, crops), ch in zip(instances, channels, strict=True)]
        return [Stage2Step(idx, crops, f) for idx, crops, f in zip(balanced, balanced_crops, fusions, strict=True)]

    def step_loss(self, net: nn.Module, step: Stage2Step, batches: list[Batch],
                  dtype: torch.dtype | None) -> torch.Tensor:
        x1, y = batches[0].images, batches[0].labels
        with autocast(x1.device, dtype):
            logits = net(x1) if step.fusion is None else net(x1, batches[1].images, step.fusion.channels)
            return cross_entropy(logits.float(), y, step.loss_scale)
