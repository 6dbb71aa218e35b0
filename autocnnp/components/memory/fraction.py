"""Memory allocation: a cap on the share of the GPU this process may use."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from autocnnp.core.settings import setting
from autocnnp.generator.registry import component


@dataclass
class Config:
    fraction: float = setting(0.9, min=0.01, max=1.0, help="share of the GPU's memory this rank may allocate")


@component("fraction")
def fraction(config: Config, *, device: torch.device) -> torch.device:
    """Cap this process at a fraction of the GPU's memory (torch.cuda.set_per_process_memory_fraction).

    TensorFlow's per_process_gpu_memory_fraction; a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(config.fraction, device)
    return device
