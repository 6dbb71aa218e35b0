"""autocnnp-demo-plugin: a dist_strategy shipped by a separate distribution.

Importing it needs no torch (the engine loads it to validate and plan a job); torch is imported when
the strategy is built on a rank.
"""

from dataclasses import dataclass

from autocnnp.generator.protocols import MPI_LAUNCHERS
from autocnnp.generator.protocols import Strategy as StrategyProtocol


class Strategy(StrategyProtocol):
    """A third-party allreduce strategy found through the autocnnp.dist_strategy entry-point group:
    gradients flattened and averaged with torch.distributed.all_reduce in ``chunks`` pieces."""

    @dataclass
    class Config:
        chunks: int = 2

    requires = {"communication_init": ("torch_distributed",)}
    launchers = MPI_LAUNCHERS

    def wrap(self, model):
        import torch.distributed as dist

        model = model.to(self.device)
        if dist.is_initialized():
            for t in [*model.parameters(), *model.buffers()]:
                dist.broadcast(t.data, src=0)
        return model

    def after_backward(self, model):
        import torch
        import torch.distributed as dist

        from autocnnp.components.strategies.tensors import pack, unpack

        if not dist.is_initialized() or dist.get_world_size() == 1:
            return
        params = [p for p in model.parameters() if p.grad is not None]
        flat = pack(params, torch.empty(sum(p.numel() for p in params), device=params[0].device), grads=True)
        for chunk in flat.chunk(self.config.chunks):
            dist.all_reduce(chunk)
        unpack(flat, params, grads=True, divisor=dist.get_world_size())
