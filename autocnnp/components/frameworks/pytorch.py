"""Framework: PyTorch (the default)."""

from __future__ import annotations

from autocnnp.generator.protocols import Framework
from autocnnp.generator.registry import component
from autocnnp.training import loop, trainer


@component("torch", aliases=("pytorch",), frameworks=("torch",))
class Torch(Framework):
    """PyTorch: torch.distributed, DDP or MPI strategies, torch modules (Keras 3 models on its torch backend).

    Each rank runs training/trainer.py's run in training/loop.py's epoch loop."""

    def build(self, gen, monitoring, *, beat=lambda: None, timeout_s: float):
        return trainer.build(gen, monitoring, beat=beat, timeout_s=timeout_s)

    def fit(self, run, monitoring, *, beat=lambda: None, should_stop=lambda: False, trackers=()):
        return loop.fit(run, monitoring, beat, should_stop, trackers)

    def checkpoint_bytes(self, gen) -> int:
        return trainer.checkpoint_bytes(gen)

    def network(self, gen, weights: dict, *, in_channels: int, num_classes: int):
        """The job's architecture with ``weights`` (a state dict; a DDP prefix is dropped)."""
        model = gen.action("architecture_injection").build(in_channels=in_channels, num_classes=num_classes)
        model.load_state_dict({k.removeprefix("module."): v for k, v in weights.items()})
        return model
