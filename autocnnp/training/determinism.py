"""Deterministic mode (``<property name="deterministic">true</property>`` in ``<hyperparameters>``).

Two runs of the same job with the same number of ranks on the same kind of machine then produce
bit-identical models and metrics. What it sets (thesis chapter 5: freeze what can be frozen):

* ``torch.use_deterministic_algorithms(True)``: an operation with no deterministic implementation
  (some CUDA kernels) stops the run with an error naming it, rather than varying silently;
* cuDNN deterministic, no cuDNN benchmark (autotuning picks kernels by timing);
  ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` for deterministic cuBLAS;
* one intra-op and one inter-op CPU thread per rank (reductions split over a varying number of
  threads sum in a varying order); this slows CPU training down;
* a DataLoader generator re-seeded from (seed, epoch, rank) every epoch, and worker processes that
  seed ``random`` and ``numpy`` from it.

Everything else that is random is already a function of (seed, epoch, rank): the initial
parameters, the DistributedSampler's shuffle, augmentation and dropout (see the trainer).
Determinism is not promised across different hardware, library versions or rank counts (the
all-reduce sums in another order); the run's manifest.json records all three.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

CUBLAS = ":4096:8"


def configure(enabled: bool) -> dict:
    """Switch deterministic mode on (if ``enabled``); returns what was set, for the manifest."""
    if not enabled:
        return {"enabled": False}
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only possible before the first inter-op parallel work; then it stays as it is
        pass
    return {"enabled": True, "use_deterministic_algorithms": True, "cudnn_deterministic": True,
            "cudnn_benchmark": False, "intra_op_threads": torch.get_num_threads(),
            "inter_op_threads": torch.get_num_interop_threads(),
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
            "dataloader": "generator re-seeded with seed + 1000 x epoch + rank each epoch; workers seed "
                          "random and numpy from torch.initial_seed()"}


def loader_generator(enabled: bool) -> torch.Generator | None:
    """The DataLoader's own generator in deterministic mode (re-seed it with :func:`seed_loader`)."""
    return torch.Generator() if enabled else None


def seed_loader(generator: torch.Generator | None, seed: int, epoch: int, rank: int) -> None:
    if generator is not None:
        generator.manual_seed(seed + 1000 * epoch + rank)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed ``random`` and ``numpy`` from the worker's torch seed."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
