"""Training augmentation: its per-image random draws, and their application to images.

Two kinds, chosen by `AugmentConfig.crop_kind`: CIFAR's pad-crop-flip (`CropFlip`, applied to a whole
batch as tensor ops) and ImageNet's RandomResizedCrop + flip (`ResizedCropFlip`, whose draws are
uniforms that become a crop box once an image's size is known, so they are drawn before any image is
read and stay a pure function of the epoch's generator)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torchvision


@dataclass(frozen=True)
class CropFlip:
    """Per-image draws of RandomCrop(size, padding) + RandomHorizontalFlip(0.5)."""

    top: torch.Tensor  # N, int64 offsets into the padded image
    left: torch.Tensor
    flip: torch.Tensor  # N, bool

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
        return CropFlip(self.top.to(device), self.left.to(device), self.flip.to(device))

    def split(self, sizes: list[int]) -> list[CropFlip]:
        parts = zip(self.top.split(sizes), self.left.split(sizes), self.flip.split(sizes), strict=True)
        return [CropFlip(t, left, f) for t, left, f in parts]

    def take(self, positions: torch.Tensor) -> CropFlip:
        """The draws at `positions` (a device's share of a batch, or mixup partners)."""
        return CropFlip(self.top[positions], self.left[positions], self.flip[positions])


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
        return self  # boxes are computed on the CPU, per image, once its size is known

    def split(self, sizes: list[int]) -> list[ResizedCropFlip]:
        parts = zip(self.area.split(sizes), self.log_ratio.split(sizes), self.top.split(sizes),
                    self.left.split(sizes), self.flip.split(sizes), strict=True)
        return [ResizedCropFlip(*p) for p in parts]

    def take(self, positions: torch.Tensor) -> ResizedCropFlip:
        """The draws at `positions` (a device's share of a batch, or mixup partners)."""
        return ResizedCropFlip(self.area[positions], self.log_ratio[positions], self.top[positions],
                               self.left[positions], self.flip[positions])

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
