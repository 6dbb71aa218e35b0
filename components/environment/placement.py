"""Processes device placement."""

from __future__ import annotations

import torch

from autocnnp.run.world import World


def local_rank(world: World) -> torch.device:
    """One GPU per local rank (``cuda:local_rank % n``); the CPU where there is no GPU."""
    if torch.cuda.is_available():
        device = torch.device("cuda", world.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def cpu(world: World) -> torch.device:
    """Every rank on the CPU, whatever GPUs exist."""
    return torch.device("cpu")
