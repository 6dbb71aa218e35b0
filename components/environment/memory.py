"""Memory allocation strategies, mapped onto torch's CUDA allocator settings (no-ops on CPU)."""

from __future__ import annotations

import os

import torch


def soft_placement(device: torch.device) -> torch.device:
    """TensorFlow's soft placement: keep the caching allocator's defaults; run on the CPU if the
    placed GPU does not exist on this node."""
    if device.type == "cuda" and (not torch.cuda.is_available() or device.index >= torch.cuda.device_count()):
        return torch.device("cpu")
    return device


def expandable_segments(device: torch.device) -> torch.device:
    """Grow GPU memory on demand in expandable segments (like TF's allow_growth, less fragmentation).

    Effective only when set before the first CUDA allocation, which is where the trainer calls it."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    return device


def fraction(device: torch.device, *, fraction: float = 0.9) -> torch.device:
    """Cap this process at ``fraction`` of its GPU (TF's per_process_gpu_memory_fraction)."""
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(fraction, device)
    return device
