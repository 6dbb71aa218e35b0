"""Batch normalisation over the global batch of all ranks, on any backend.

torch's ``nn.SyncBatchNorm`` refuses CPU modules under DDP; this layer computes the same
statistics with one differentiable all-reduce of (sum, sum of squares, count) per layer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

from autocnnp.generator.protocols import collective_wait


class CrossRankBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover every rank's samples."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)
        dims = [d for d in range(x.dim()) if d != 1]
        c = x.size(1)
        local = torch.cat([x.sum(dims), (x * x).sum(dims), x.new_full((1,), x.numel() / c)])
        with collective_wait.blocking():
            total = dist_fn.all_reduce(local)
        count = total[-1]
        mean = total[:c] / count
        var = total[c:2 * c] / count - mean * mean
        if self.track_running_stats:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(var.detach() * count / (count - 1), m)
                self.num_batches_tracked += 1
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def convert(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm layer of ``module`` by a CrossRankBatchNorm holding the same state: its
    parameters themselves (a frozen one stays frozen), buffers and mode, as torch's convert_sync_batchnorm."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CrossRankBatchNorm):
        new = CrossRankBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                 module.track_running_stats)
        new.load_state_dict(module.state_dict())
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        return new.train(module.training)
    for name, child in module.named_children():
        setattr(module, name, convert(child))
    return module
