"""H2T: fuse feature maps of instance-sampled (head-heavy) images into class-balanced (tail-heavy) ones.

Li et al., "Feature Fusion from Head to Tail for Long-Tailed Visual Recognition", AAAI 2024.
Also the class-balanced sampler of the fused branch in stage 2 (the fusing branch is a plain shuffle).
"""

from __future__ import annotations

import torch


def fuse(
    fused: torch.Tensor, fusing: torch.Tensor, rho: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Replace int(rho * C) randomly chosen channels of `fused` with those of `fusing`.

    One channel subset is drawn per call and shared by the whole batch, as in the official code.
    Both inputs are N x C x H x W of the same shape and are left unmodified; the result is new.
    """
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must be in [0, 1], got {rho}")
    if fused.ndim != 4 or fused.shape != fusing.shape:
        raise ValueError(
            f"fuse needs two N x C x H x W maps of one shape, got {tuple(fused.shape)} and {tuple(fusing.shape)}")
    return fuse_channels(fused, fusing, fusion_channels(fused.shape[1], rho, generator).to(fused.device))


def fusion_channels(num_channels: int, rho: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random subset of int(rho * C) channel indices."""
    return torch.randperm(num_channels, generator=generator)[: int(rho * num_channels)]


def fuse_channels(fused: torch.Tensor, fusing: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """A copy of `fused` whose `channels` come from `fusing`."""
    out = fused.clone()
    if channels.numel():
        out[:, channels] = fusing[:, channels]
    return out


def class_balanced_indices(labels: torch.Tensor, num_draws: int, generator: torch.Generator) -> torch.Tensor:
    """Draw a class uniformly among classes present, then a sample of that class uniformly, num_draws times."""
    labels = labels.cpu()
    present = torch.unique(labels)
    by_class = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels)
    starts = torch.cumsum(counts, 0) - counts
    cls = present[torch.randint(0, len(present), (num_draws,), generator=generator)]
    offset = (torch.rand(num_draws, generator=generator, dtype=torch.float64) * counts[cls]).long()
    return by_class[starts[cls] + offset]
