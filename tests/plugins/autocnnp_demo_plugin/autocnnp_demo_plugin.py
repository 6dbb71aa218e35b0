"""autocnnp-demo-plugin: a dist_strategy shipped by a separate distribution.

Importing it needs no torch (the engine loads it to validate and plan a job); torch is imported when
the strategy is built on a rank.
"""

from dataclasses import dataclass


class Strategy:
    """A third-party allreduce strategy found through the autocnnp.dist_strategy entry-point group:
    gradients flattened and averaged with torch.distributed.all_reduce in ``chunks`` pieces."""

    @dataclass
    class Config:
        chunks: int = 2

    requires = {"communication_init": ("torch_distributed",)}
    launchers = ("mpirun", "inplace")

    def __init__(self, *, world=None, device=None, chunks: int = 2):
        self.world, self.device, self.chunks = world, device, chunks

    def wrap(self, model):
        import torch.distributed as dist

        model = model.to(self.device)
        if dist.is_initialized():
            for t in [*model.parameters(), *model.buffers()]:
                dist.broadcast(t.data, src=0)
        return model

    def wrap_optimizer(self, optimizer, model):
        return optimizer

    def sampler(self, dataset, *, shuffle, seed):
        from torch.utils.data import DistributedSampler

        return DistributedSampler(dataset, num_replicas=self.world.size, rank=self.world.rank, shuffle=shuffle,
                                  seed=seed)

    def after_backward(self, model):
        import torch
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_world_size() == 1:
            return
        params = [p for p in model.parameters() if p.grad is not None]
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        for chunk in flat.chunk(self.chunks):
            dist.all_reduce(chunk)
        flat.div_(dist.get_world_size())
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
            offset += p.numel()

    def end_epoch(self, model):
        pass

    def unwrap(self, model):
        return model
