"""What each ``precision`` setting means for torch: the autocast dtype and the fp16 loss scaler."""

from __future__ import annotations

import torch

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device``, None for float32 (no autocast). ``auto`` (inference)
    is bf16 on a GPU that supports it, else fp16, and float32 on a CPU."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return AUTOCAST_DTYPES[precision]


def mixed_precision(precision: str, device: torch.device):
    """An autocast context and a gradient scaler (a no-op scaler unless fp16)."""
    dtype = autocast_dtype(precision, device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    return autocast, torch.amp.GradScaler(device.type, enabled=precision == "fp16")
