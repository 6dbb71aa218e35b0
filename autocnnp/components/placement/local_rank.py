"""Device placement: one GPU per local rank."""

from __future__ import annotations

import torch

from autocnnp.core.world import World
from autocnnp.generator.registry import component


@component("local_rank")
def local_rank(*, world: World) -> torch.device:
    """One GPU per local rank (cuda:local_rank mod GPUs); CPU where no GPU is present."""
    if torch.cuda.is_available():
        device = torch.device("cuda", world.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")
