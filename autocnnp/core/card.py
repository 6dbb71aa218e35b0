"""What a checkpoint says of its model (its ``model_card``: the framework, the architecture ...), read
without torch, so that the front-end can check a checkpoint before any rank starts.

An autocnnp checkpoint is ``torch.save``'s zip archive of a pickled dict whose tensors are stored beside
it. The pickle is read with an unpickler that imports nothing and runs nothing: every object that is no
plain container or value (tensors, arrays, optimizer states) becomes an empty placeholder.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path


class _Placeholder:
    """What any class of the pickle becomes: it takes every argument, state and item, and keeps none."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, item):
        pass

    def extend(self, items):
        pass


class _Dict(dict):
    """An OrderedDict of the pickle (a state dict), whose attributes (``_metadata``) are dropped."""

    def __setstate__(self, state):
        pass


class _Skeleton(pickle.Unpickler):
    def find_class(self, module, name):
        return _Dict if (module, name) == ("collections", "OrderedDict") else _Placeholder

    def persistent_load(self, pid):
        return None


def checkpoint_card(path: Path) -> dict | None:
    """The ``model_card`` of the checkpoint at ``path`` ({} when it has none: older checkpoints); None when
    the file is no torch checkpoint archive that can be read."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("/data.pkl")), None)
            if name is None:
                return None
            with archive.open(name) as f:
                state = _Skeleton(f).load()
    except Exception:  # noqa: BLE001 - an unreadable or damaged file: the caller's own reading reports it
        return None
    if not isinstance(state, dict):
        return None
    card = state.get("model_card")
    return card if isinstance(card, dict) else {}


def card_framework(card: dict) -> str:
    """The framework a model card says wrote its checkpoint (cards of older checkpoints: torch)."""
    return str(card.get("framework") or "torch")


def trained_framework(path: Path) -> str | None:
    """The framework that wrote the checkpoint at ``path`` (older checkpoints: torch); None if unreadable."""
    card = checkpoint_card(path)
    return None if card is None else card_framework(card)


def card_dimension(card: dict) -> str:
    """What a model card says its network takes: ``3d`` patches or ``2d`` slices (cards written before 3D: 2d)."""
    return str(card.get("dimension") or "2d")
