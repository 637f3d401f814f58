"""The memory layout of model inputs and the autocast context on the training device."""

from __future__ import annotations

import torch


def to_model_layout(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    # oneDNN convolutions on the CPU are faster in channels_last; CUDA keeps NCHW
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cpu" else x


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """Autocast to `dtype`, or a disabled context for plain fp32."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
