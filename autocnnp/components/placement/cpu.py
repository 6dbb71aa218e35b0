"""Device placement: every rank on the CPU."""

from __future__ import annotations

import torch

from autocnnp.core.world import World
from autocnnp.generator.registry import component


@component("cpu")
def cpu(*, world: World) -> torch.device:
    """Every rank on the CPU, whatever GPUs exist."""
    del world
    return torch.device("cpu")
