"""The dataset on the training device, the memory layout of model inputs and the autocast context."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.core.augment import CropFlip, crop_flip, normalize
from models.core.data import Dataset


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

    @property
    def device(self) -> torch.device:
        return self.train_images.device

    def augmented(self, idx: torch.Tensor, draws: CropFlip) -> torch.Tensor:
        return normalize(crop_flip(self.train_images[idx], self.padding, draws), self.mean, self.std)


def to_model_layout(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    # oneDNN convolutions on the CPU are faster in channels_last; CUDA keeps NCHW
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cpu" else x


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """Autocast to `dtype`, or a disabled context for plain fp32."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
