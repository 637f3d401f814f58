"""Training augmentation: its per-image random draws, and their application to images.

Two kinds, chosen by `AugmentConfig.crop_kind`: CIFAR's pad-crop-flip (`CropFlip`, applied to a whole
batch as tensor ops) and ImageNet's RandomResizedCrop + flip (`ResizedCropFlip`, whose draws are
uniforms that become a crop box once an image's size is known, so they are drawn before any image is
read and stay a pure function of the epoch's generator)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
import torchvision

PolicyName = Literal["autoaugment_cifar", "randaugment"]
AUTOAUGMENT_BINS, RANDAUGMENT_BINS = 10, 31  # magnitude bins, as torchvision's AutoAugment and RandAugment


def _policy_transform(policy: PolicyName):
    """torchvision's own transform of the policy: its operations, their magnitudes and their effect on an image
    are taken from it, so a batch is augmented exactly as torchvision augments one image."""
    from torchvision.transforms import v2

    if policy == "autoaugment_cifar":
        return v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)
    return v2.RandAugment()


@dataclass(frozen=True)
class PolicyDraws:
    """Per-image draws of AutoAugment's CIFAR-10 policy or of RandAugment: in each of K slots, an operation
    (an index into `table`, of (operation, magnitude bin)), whether it applies and the sign of its magnitude.
    AutoAugment draws one of its 25 sub-policies per image (2 slots, each applied with the sub-policy's
    probability); RandAugment draws K operations uniformly, each always applied at one magnitude."""

    policy: PolicyName
    table: tuple[tuple[str, int | None], ...]
    ops: torch.Tensor  # N x K int64, into `table`
    applied: torch.Tensor  # N x K bool
    negative: torch.Tensor  # N x K bool: the magnitude's sign, for the operations that have one

    @classmethod
    def draw(cls, n: int, policy: PolicyName, generator: torch.Generator, ops: int = 2,
             magnitude: int = 9) -> PolicyDraws:
        transform = _policy_transform(policy)
        if policy == "autoaugment_cifar":
            subs = transform._policies  # 25 sub-policies of two (operation, probability, magnitude bin)
            table = tuple((name, bin_) for sub in subs for name, _, bin_ in sub)
            probability = torch.tensor([[p for _, p, _ in sub] for sub in subs])
            chosen = torch.randint(0, len(subs), (n,), generator=generator)
            coins = torch.rand(n, 2, generator=generator)
            indices = chosen[:, None] * 2 + torch.arange(2)
            applied = coins < probability[chosen]
        else:
            names = list(transform._AUGMENTATION_SPACE)
            table = tuple((name, magnitude) for name in names)
            indices = torch.randint(0, len(names), (n, ops), generator=generator)
            applied = torch.ones(n, ops, dtype=torch.bool)
        negative = torch.rand(indices.shape, generator=generator) < 0.5
        return cls(policy, table, indices, applied, negative)

    def to(self, device: torch.device) -> PolicyDraws:
        return replace(self, ops=self.ops.to(device), applied=self.applied.to(device),
                       negative=self.negative.to(device))

    def split(self, sizes: list[int]) -> list[PolicyDraws]:
        parts = zip(self.ops.split(sizes), self.applied.split(sizes), self.negative.split(sizes), strict=True)
        return [replace(self, ops=o, applied=a, negative=g) for o, a, g in parts]

    def take(self, positions: torch.Tensor) -> PolicyDraws:
        return replace(self, ops=self.ops[positions], applied=self.applied[positions],
                       negative=self.negative[positions])

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N x 3 x H x W -> the same, each image with its operations applied in slot order: one call of
        torchvision's operation per (slot, operation, sign) on the images that drew it."""
        transform = _policy_transform(self.policy)
        bins = AUTOAUGMENT_BINS if self.policy == "autoaugment_cifar" else RANDAUGMENT_BINS
        height, width = images.shape[-2:]
        out = images.clone()
        for slot in range(self.ops.shape[1]):
            wanted = self.ops[:, slot].masked_fill(~self.applied[:, slot], -1)
            for op in torch.unique(wanted).tolist():
                if op < 0:
                    continue
                name, bin_ = self.table[op]
                magnitudes, signed = transform._AUGMENTATION_SPACE[name]
                levels = magnitudes(bins, height, width)
                size = float(levels[bin_]) if levels is not None and levels.ndim > 0 and bin_ is not None else 0.0
                for negative in ((False, True) if signed else (False,)):
                    chosen = (wanted == op) & (self.negative[:, slot] == negative if signed else True)
                    positions = chosen.nonzero().flatten()
                    if len(positions):
                        out[positions] = transform._apply_image_or_video_transform(
                            out[positions], name, -size if negative else size, transform.interpolation,
                            transform._fill)
        return out


@dataclass(frozen=True)
class CutoutDraws:
    """Cutout (DeVries and Taylor, 2017): one `length` x `length` square per image, centred anywhere in the
    image and clipped at its borders, set to zero (black, as Cutout before normalisation)."""

    length: int
    centre_y: torch.Tensor  # N, uniform in [0, 1): the centre's row as a fraction of the height
    centre_x: torch.Tensor

    @classmethod
    def draw(cls, n: int, length: int, generator: torch.Generator) -> CutoutDraws:
        return cls(length, torch.rand(n, generator=generator), torch.rand(n, generator=generator))

    def to(self, device: torch.device) -> CutoutDraws:
        return replace(self, centre_y=self.centre_y.to(device), centre_x=self.centre_x.to(device))

    def split(self, sizes: list[int]) -> list[CutoutDraws]:
        parts = zip(self.centre_y.split(sizes), self.centre_x.split(sizes), strict=True)
        return [replace(self, centre_y=y, centre_x=x) for y, x in parts]

    def take(self, positions: torch.Tensor) -> CutoutDraws:
        return replace(self, centre_y=self.centre_y[positions], centre_x=self.centre_x[positions])

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        device = images.device
        cy = (self.centre_y * height).long()[:, None]
        cx = (self.centre_x * width).long()[:, None]
        half = self.length // 2
        rows = torch.arange(height, device=device)[None, :]
        cols = torch.arange(width, device=device)[None, :]
        inside_rows = (rows >= cy - half) & (rows < cy + half)  # N x H
        inside_cols = (cols >= cx - half) & (cols < cx + half)  # N x W
        hole = inside_rows[:, :, None] & inside_cols[:, None, :]  # N x H x W
        return images.masked_fill(hole[:, None], 0)


ExtraDraws = PolicyDraws | CutoutDraws


def _split_extras(extras: tuple[ExtraDraws, ...], sizes: list[int]) -> list[tuple[ExtraDraws, ...]]:
    """Per part of `sizes`, its share of every extra."""
    if not extras:
        return [()] * len(sizes)
    return [tuple(part) for part in zip(*(e.split(sizes) for e in extras), strict=True)]


@dataclass(frozen=True)
class CropFlip:
    """Per-image draws of RandomCrop(size, padding) + RandomHorizontalFlip(0.5)."""

    top: torch.Tensor  # N, int64 offsets into the padded image
    left: torch.Tensor
    flip: torch.Tensor  # N, bool
    extras: tuple[ExtraDraws, ...] = ()  # applied after the crop, in order, on the training device

    @classmethod
    def draw(cls, n: int, padding: int, generator: torch.Generator, crop: bool = True, flip: bool = True) -> CropFlip:
        """Uniform offsets in [0, 2 * padding] (centred without `crop`), a fair coin per flip."""
        top = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        left = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        flips = torch.rand(n, generator=generator) < 0.5
        if not crop:
            top, left = torch.full_like(top, padding), torch.full_like(left, padding)
        return cls(top, left, flips if flip else torch.zeros_like(flips))

    def to(self, device: torch.device) -> CropFlip:
        return CropFlip(self.top.to(device), self.left.to(device), self.flip.to(device),
                        tuple(e.to(device) for e in self.extras))

    def split(self, sizes: list[int]) -> list[CropFlip]:
        parts = zip(self.top.split(sizes), self.left.split(sizes), self.flip.split(sizes),
                    _split_extras(self.extras, sizes), strict=True)
        return [CropFlip(t, left, f, extras) for t, left, f, extras in parts]

    def take(self, positions: torch.Tensor) -> CropFlip:
        """The draws at `positions` (a device's share of a batch, or mixup partners)."""
        return CropFlip(self.top[positions], self.left[positions], self.flip[positions],
                        tuple(e.take(positions) for e in self.extras))


def crop_flip(images: torch.Tensor, padding: int, draws: CropFlip) -> torch.Tensor:
    """Apply crop (zero fill, as torchvision's RandomCrop) and flip draws to a uint8 N x C x H x W batch."""
    n, _, h, w = images.shape
    device = images.device
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    rows = draws.top[:, None] + torch.arange(h, device=device)  # n x h
    cols = torch.arange(w, device=device).expand(n, w)
    cols = torch.where(draws.flip[:, None], cols.flip(1), cols) + draws.left[:, None]  # n x w
    batch = torch.arange(n, device=device)[:, None, None]
    # advanced indexing puts the indexed dims first: n x h x w x c
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, out: torch.Tensor | None = None
              ) -> torch.Tensor:
    """uint8 N x C x H x W -> float32, scaled to 0..1 and standardised per channel, keeping the memory layout
    (into `out` when given): one float copy, then two in-place passes (a third of the memory traffic of the
    textbook expression)."""
    scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1)
    shift = (-mean / std).view(1, -1, 1, 1)
    x = images.float() if out is None else out.copy_(images)
    return x.mul_(scale).add_(shift)


def mixup_lambda(alpha: float, generator: torch.Generator) -> float:
    """lambda ~ Beta(alpha, alpha), drawn through a numpy generator seeded from `generator`."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def mix(inputs: torch.Tensor, perm: torch.Tensor, lam: float) -> torch.Tensor:
    """Input mixup of a batch with its permutation `perm`."""
    return lam * inputs + (1.0 - lam) * inputs[perm]


RESIZED_CROP_ATTEMPTS = 10  # as torchvision's RandomResizedCrop
RESIZED_CROP_AREA = (0.08, 1.0)
RESIZED_CROP_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))


@dataclass(frozen=True)
class ResizedCropFlip:
    """Per-image draws of RandomResizedCrop(scale=(0.08, 1), ratio=(3/4, 4/3)) + RandomHorizontalFlip(0.5),
    as uniforms: `crop_box` turns them into torchvision's box for an image of any size."""

    area: torch.Tensor  # N x attempts, fraction of the image's area
    log_ratio: torch.Tensor  # N x attempts, log of width / height
    top: torch.Tensor  # N, where the crop sits in the rows left free, 0..1
    left: torch.Tensor  # N, the same for columns
    flip: torch.Tensor  # N, bool
    extras: tuple[ExtraDraws, ...] = ()  # applied after the crop, in order, on the training device

    @classmethod
    def draw(cls, n: int, generator: torch.Generator, crop: bool = True, flip: bool = True) -> ResizedCropFlip:
        """Without `crop`, every draw asks for the whole image (torchvision's fallback box)."""
        lo, hi = RESIZED_CROP_AREA
        area = lo + (hi - lo) * torch.rand(n, RESIZED_CROP_ATTEMPTS, generator=generator)
        lo, hi = RESIZED_CROP_LOG_RATIO
        log_ratio = lo + (hi - lo) * torch.rand(n, RESIZED_CROP_ATTEMPTS, generator=generator)
        top = torch.rand(n, generator=generator)
        left = torch.rand(n, generator=generator)
        flips = torch.rand(n, generator=generator) < 0.5
        if not crop:
            area, log_ratio = torch.full_like(area, 2.0), torch.zeros_like(log_ratio)  # never fits: the fallback
        return cls(area, log_ratio, top, left, flips if flip else torch.zeros_like(flips))

    def to(self, device: torch.device) -> ResizedCropFlip:
        # boxes are computed on the CPU, per image, once its size is known; the extras run on the device
        return replace(self, extras=tuple(e.to(device) for e in self.extras))

    def split(self, sizes: list[int]) -> list[ResizedCropFlip]:
        parts = zip(self.area.split(sizes), self.log_ratio.split(sizes), self.top.split(sizes),
                    self.left.split(sizes), self.flip.split(sizes), _split_extras(self.extras, sizes), strict=True)
        return [ResizedCropFlip(*p) for p in parts]

    def take(self, positions: torch.Tensor) -> ResizedCropFlip:
        """The draws at `positions` (a device's share of a batch, or mixup partners)."""
        return ResizedCropFlip(self.area[positions], self.log_ratio[positions], self.top[positions],
                               self.left[positions], self.flip[positions],
                               tuple(e.take(positions) for e in self.extras))

    def crop_box(self, i: int, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, width, height) of draw `i` in a width x height image: the first attempt whose box fits,
        else the whole image clamped to the ratio range and centred, exactly as torchvision decides."""
        total = width * height
        for area, log_ratio in zip(self.area[i].tolist(), self.log_ratio[i].tolist(), strict=True):
            ratio = math.exp(log_ratio)
            w = int(round(math.sqrt(total * area * ratio)))
            h = int(round(math.sqrt(total * area / ratio)))
            if 0 < w <= width and 0 < h <= height:
                top = min(int(float(self.top[i]) * (height - h + 1)), height - h)
                left = min(int(float(self.left[i]) * (width - w + 1)), width - w)
                return left, top, w, h
        ratio = width / height
        lo, hi = (math.exp(r) for r in RESIZED_CROP_LOG_RATIO)
        if ratio < lo:
            w, h = width, int(round(width / lo))
        elif ratio > hi:
            w, h = int(round(height * hi)), height
        else:
            w, h = width, height
        return (width - w) // 2, (height - h) // 2, w, h


def resized_crops(images: list[torch.Tensor] | torch.Tensor, draws: ResizedCropFlip, size: int) -> torch.Tensor:
    """Apply resized-crop-flip draws to uint8 3 x H x W images (a batch, or a list of any sizes) on their
    device: bilinear sampling averaged over each output pixel's footprint (antialiased), to uint8 N x 3 x S x S.
    A batch is cropped in one call; a list of differently sized images one image at a time."""
    boxes = torch.tensor([[i, left, top, left + w, top + h] for i, (left, top, w, h) in enumerate(
        draws.crop_box(i, image.shape[-1], image.shape[-2]) for i, image in enumerate(images))], dtype=torch.float32)
    if isinstance(images, torch.Tensor):
        boxes = boxes.to(images.device)
        out = torchvision.ops.roi_align(images.float(), boxes, (size, size), sampling_ratio=-1, aligned=True)
    else:
        boxes = boxes.to(images[0].device) if images else boxes
        boxes[:, 0] = 0  # each image is a batch of one
        out = torch.cat([torchvision.ops.roi_align(image[None].float(), boxes[i:i + 1], (size, size),
                                                   sampling_ratio=-1, aligned=True) for i, image in enumerate(images)])
    flips = draws.flip.to(out.device)[:, None, None, None]
    return torch.where(flips, out.flip(-1), out).round_().clamp_(0, 255).to(torch.uint8)


Draws = CropFlip | ResizedCropFlip  # an epoch's augmentation draws, of either kind


def with_extras(draws: Draws, extras: tuple[ExtraDraws, ...]) -> Draws:
    """The same crop draws, followed by `extras` (drawn for the same images, in the same order)."""
    return replace(draws, extras=draws.extras + extras)


def apply_extras(images: torch.Tensor, draws: Draws) -> torch.Tensor:
    """The extras of `draws` applied, in order, to the uint8 batch their crops made (on its device)."""
    for extra in draws.extras:
        images = extra.apply(images)
    return images


@dataclass(frozen=True)
class Augmentation:
    """The training augmentation of a run on its data: which kind, at what size, with which parts on."""

    kind: str  # "pad" | "resized"
    image_size: int
    crop: bool = True
    flip: bool = True

    @property
    def padding(self) -> int:
        return max(1, self.image_size // 8)  # 4 for 32x32 images, as RandomCrop(32, padding=4)

    def draw(self, n: int, generator: torch.Generator) -> Draws:
        if self.kind == "pad":
            return CropFlip.draw(n, self.padding, generator, self.crop, self.flip)
        return ResizedCropFlip.draw(n, generator, self.crop, self.flip)

    def apply(self, images: torch.Tensor, draws: Draws) -> torch.Tensor:
        """uint8 N x 3 x S x S images (held in memory) -> their augmented uint8 batch."""
        if isinstance(draws, CropFlip):
            return crop_flip(images, self.padding, draws)
        return resized_crops(images, draws, self.image_size)
