"""Memory allocation: TensorFlow's soft placement, on torch's defaults."""

from __future__ import annotations

import torch

from autocnnp.generator.registry import component


@component("soft_placement")
def soft_placement(*, device: torch.device) -> torch.device:
    """Caching allocator defaults; fall back to the CPU when the placed GPU is absent."""
    if device.type == "cuda" and (not torch.cuda.is_available() or device.index >= torch.cuda.device_count()):
        return torch.device("cpu")
    return device
