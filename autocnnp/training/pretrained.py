"""Transfer learning: start a network from another one's weights (``<CNN_archi pretrained=...>``).

Every tensor whose name and shape match is copied; the others keep their fresh initialisation, so a
model trained for other classes gets a new head (and other input channels a new first layer).
``freeze="encoder"`` stops the gradients of the architecture's encoder (``net.encoder()``: the U-Net's
contracting path, the FCN's VGG stages; a user architecture may define it).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.errors import DataError


def load_pretrained(net: torch.nn.Module, checkpoint: Path, freeze: str) -> str:
    """Copy the matching weights of ``checkpoint`` (an autocnnp checkpoint) into ``net``; freeze its encoder
    when asked. Returns one line saying what was loaded, what was left fresh and what is frozen."""
    if not Path(checkpoint).is_file():
        raise DataError(checkpoint, "the pretrained checkpoint is not there",
                        "run the job with `autocnnp run` (it fetches zoo models first), or `autocnnp zoo pull` it")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        saved = state["model"]
    except Exception as exc:  # noqa: BLE001 - anything unreadable
        raise DataError(checkpoint, f"cannot be read as a checkpoint ({type(exc).__name__}: {str(exc)[:200]})",
                        "name a checkpoint written by autocnnp run, or a zoo model") from None
    trained = (state.get("model_card") or {}).get("framework", "torch")
    if trained != "torch":
        raise DataError(checkpoint, f"holds a {trained} model; pretrained weights start torch networks",
                        "start from a checkpoint of a torch run of the same architecture")
    saved = {k.removeprefix("module."): v for k, v in saved.items()}
    own = net.state_dict()
    loaded = {k: v for k, v in saved.items() if k in own and own[k].shape == v.shape}
    if not loaded:
        raise DataError(checkpoint, "no tensor of it fits this architecture", "start from a model of the same "
                        "architecture (and parameters)")
    net.load_state_dict(loaded, strict=False)
    fresh = sorted(k for k in own if k not in loaded)
    text = f"{len(loaded)} of {len(own)} tensors from {checkpoint}" + (
        f"; new: {', '.join(fresh[:6])}{' ...' if len(fresh) > 6 else ''}" if fresh else "")
    if freeze == "encoder":
        encoder = getattr(net, "encoder", None)
        if not callable(encoder):
            raise DataError(checkpoint, f"freeze=encoder, but the architecture {type(net).__name__} names no encoder",
                            "define encoder() returning its encoder modules, or use freeze=none")
        params = [p for module in encoder() for p in module.parameters()]
        for p in params:
            p.requires_grad_(False)
        text += f"; encoder frozen ({sum(p.numel() for p in params)} parameters)"
    return text
