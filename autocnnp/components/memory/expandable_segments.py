"""Memory allocation: GPU memory that grows on demand in expandable segments."""

from __future__ import annotations

import os

import torch

from autocnnp.generator.registry import component


@component("expandable_segments")
def expandable_segments(*, device: torch.device) -> torch.device:
    """PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (less fragmentation, grows on demand).

    Like TensorFlow's allow_growth; effective only when set before the first CUDA allocation, which
    is where the trainer calls it. A no-op on CPU."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    return device
