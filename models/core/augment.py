"""Batch augmentation as tensor ops, so training never does per-image PIL work."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


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


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 N x C x H x W -> float32, scaled to 0..1 and standardised per channel."""
    return (images.float() / 255.0 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def mixup_lambda(alpha: float, generator: torch.Generator) -> float:
    """lambda ~ Beta(alpha, alpha), drawn through a numpy generator seeded from `generator`."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def mix(inputs: torch.Tensor, perm: torch.Tensor, lam: float) -> torch.Tensor:
    """Input mixup of a batch with its permutation `perm`."""
    return lam * inputs + (1.0 - lam) * inputs[perm]
