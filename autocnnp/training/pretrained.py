"""Transfer learning: start a network from another one's weights (``<CNN_archi pretrained=...>``).

Every tensor whose name and shape match is copied; the others keep their fresh initialisation, so a
model trained for other classes gets a new head (and other input channels a new first layer).
``freeze="encoder"`` stops the gradients of the architecture's encoder (``net.encoder()``: the U-Net's
contracting path, the FCN's VGG stages; a user architecture may define it: the
:class:`~autocnnp.generator.protocols.Encoded` protocol, or hold its encoder as a sub-module named
``encoder``), except for the tensors that
were newly initialised (they always train), and keeps the running statistics of its loaded norm layers:
those layers stay in evaluation mode throughout training (:meth:`Transfer.keep_frozen`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.errors import DataError
from ..generator.protocols import Encoded


@dataclass
class Transfer:
    """What :func:`load_pretrained` did: its one-line summary and the names of the frozen norm layers (names, as
    a strategy may replace the layers: sync_batchnorm)."""

    summary: str
    frozen_norms: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return self.summary

    def keep_frozen(self, net: torch.nn.Module) -> None:
        """Put the frozen norm layers of ``net`` (unwrapped) back in evaluation mode after ``model.train()``:
        they normalise with, and never update, their pretrained running statistics."""
        modules = dict(net.named_modules())
        for name in self.frozen_norms:
            modules[name].eval()


def read_pretrained(checkpoint: Path, framework: str) -> dict:
    """The network tensors (``state["model"]``) of ``checkpoint``, an autocnnp checkpoint of a ``framework``
    run."""
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
    if trained != framework:
        raise DataError(checkpoint, f"holds a {trained} model; this job trains {framework} networks",
                        f"start from a checkpoint of a {framework} run of the same architecture")
    return saved


def loaded_summary(checkpoint: Path, loaded: int, total: int, fresh: list[str]) -> str:
    """``N of M tensors from FILE; new: ...``; refuses a checkpoint of which nothing fits."""
    if not loaded:
        raise DataError(checkpoint, "no tensor of it fits this architecture", "start from a model of the same "
                        "architecture (and parameters)")
    return f"{loaded} of {total} tensors from {checkpoint}" + (
        f"; new: {', '.join(fresh[:6])}{' ...' if len(fresh) > 6 else ''}" if fresh else "")


def frozen_summary(frozen: int, norms: int, still_new: int) -> str:
    """What ``freeze="encoder"`` froze, in the words of the console line."""
    return (f"; encoder frozen ({frozen} parameters, {norms} norm layers keep their statistics"
            + (f"; {still_new} newly initialised parameters in it train" if still_new else "") + ")")


def load_pretrained(net: torch.nn.Module, checkpoint: Path, freeze: str) -> Transfer:
    """Copy the matching weights of ``checkpoint`` (an autocnnp checkpoint) into ``net``; freeze its encoder
    when asked (what was newly initialised still trains). Says what was loaded, left fresh and frozen."""
    saved = {k.removeprefix("module."): v for k, v in read_pretrained(checkpoint, "torch").items()}
    own = net.state_dict()
    loaded = {k: v for k, v in saved.items() if k in own and own[k].shape == v.shape}
    if loaded:
        net.load_state_dict(loaded, strict=False)
    transfer = Transfer(loaded_summary(checkpoint, len(loaded), len(own), sorted(k for k in own if k not in loaded)))
    if freeze == "encoder":
        encoder = encoder_modules(net)
        if encoder is None:
            raise DataError(checkpoint, f"freeze=encoder, but the architecture {type(net).__name__} names no encoder",
                            "define encoder() returning its encoder modules (or hold it as a sub-module named "
                            "encoder), or use freeze=none")
        _freeze(net, encoder, set(loaded), transfer)
    return transfer


def encoder_modules(net: torch.nn.Module) -> list[torch.nn.Module] | None:
    """The modules of ``net``'s encoder: its sub-module named ``encoder`` (a module is callable, but calling it runs
    its forward pass), else what its ``encoder()`` method returns; None when it names none."""
    named = getattr(net, "encoder", None)
    if isinstance(named, torch.nn.Module):
        return [named]
    return list(net.encoder()) if isinstance(net, Encoded) and callable(named) else None


def _freeze(net: torch.nn.Module, encoder: list[torch.nn.Module], loaded: set[str], transfer: Transfer) -> None:
    """Stop the gradients of the encoder's loaded parameters, and keep the statistics of its norm layers
    whose tensors were all loaded; a newly initialised tensor (and its layer's statistics) trains."""
    in_encoder = {id(m) for top in encoder for m in top.modules()}
    frozen = []
    for name, module in net.named_modules():
        if id(module) not in in_encoder:
            continue
        prefix = f"{name}." if name else ""
        own = [prefix + key for key, _ in module.named_parameters(recurse=False)]
        own += [prefix + key for key, b in module.named_buffers(recurse=False) if b is not None]
        for key, p in module.named_parameters(recurse=False):
            if prefix + key in loaded:
                p.requires_grad_(False)
                frozen.append(p)
        statistics = getattr(module, "track_running_stats", False)
        if statistics and all(key in loaded for key in own):
            transfer.frozen_norms.append(name)
    still_new = sum(p.numel() for top in encoder for p in top.parameters() if p.requires_grad)
    transfer.summary += frozen_summary(sum(p.numel() for p in frozen), len(transfer.frozen_norms), still_new)
