"""Tensor movement the strategies share: many tensors packed into one flat buffer and back, and
MPI broadcasts of a module's tensors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from autocnnp.core.settings import setting
from autocnnp.generator.protocols import StrategyConfig


@dataclass
class BucketConfig(StrategyConfig):
    """Strategies that reduce gradients in buckets, as DDP does."""

    bucket_cap_mb: float = setting(25.0, min=0.1, help="gradients reduced together, at most this many MiB")


def mpi():
    """The mpi4py MPI module (importing it initialises MPI, so only strategies that talk MPI call this)."""
    from mpi4py import MPI

    return MPI


def pieces(flat: torch.Tensor, tensors: Sequence[torch.Tensor]):
    """``(piece of flat shaped as t, t)`` for each of ``tensors``, laid out one after another."""
    offset = 0
    for t in tensors:
        n = t.numel()
        yield flat[offset:offset + n].view(t.shape), t
        offset += n


def pack(tensors: Sequence[torch.Tensor], flat: torch.Tensor, *, grads: bool = False) -> torch.Tensor:
    """Copy ``tensors`` (their gradients with ``grads``; zeros where a gradient is None) one after another
    into ``flat``, skipping those that already are their piece of it; returns ``flat``."""
    with torch.no_grad():
        for piece, t in pieces(flat, tensors):
            value = t.grad if grads else t
            if value is None:
                piece.zero_()
            elif (value.device, value.data_ptr(), value.stride()) != (piece.device, piece.data_ptr(), piece.stride()):
                piece.copy_(value.detach())
    return flat


def unpack(flat: torch.Tensor, tensors: Sequence[torch.Tensor], *, grads: bool = False, divisor: float = 1.0,
           views: bool = False) -> None:
    """Copy consecutive pieces of ``flat``, divided by ``divisor``, into ``tensors`` (their gradients with
    ``grads``, created where None), keeping each tensor's device and dtype. With ``views`` (gradients, no
    divisor) the gradient of a tensor on ``flat``'s device becomes its piece of ``flat``: nothing is copied."""
    with torch.no_grad():
        for piece, t in pieces(flat, tensors):
            value = piece / divisor if divisor != 1 else piece
            if views and t.device == flat.device:
                t.grad = value
            elif grads and t.grad is None:
                t.grad = value.to(t.device, t.dtype, copy=True)
            else:
                (t.grad if grads else t).copy_(value)


# dtypes MPI can send directly from a numpy view
_MPI_DTYPES = (torch.float64, torch.float32, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def bcast_tensor(t: torch.Tensor, root: int, comm) -> None:
    """Overwrite ``t`` on every rank with ``root``'s values (through a CPU copy where numpy cannot view it)."""
    direct = t.device.type == "cpu" and t.is_contiguous() and t.dtype in _MPI_DTYPES
    work = t.detach() if direct else t.detach().to("cpu", t.dtype if t.dtype in _MPI_DTYPES else torch.float64)
    work = work.contiguous()
    comm.Bcast(work.numpy(), root=root)
    if not direct:
        with torch.no_grad():
            t.copy_(work.to(t.device, t.dtype))


def bcast_module(module: nn.Module, root: int, comm, buffers_only: bool = False) -> None:
    """Give every rank ``root``'s parameters and buffers (in registration order, so ranks match)."""
    tensors = [] if buffers_only else list(module.parameters())
    for t in [*tensors, *module.buffers()]:
        bcast_tensor(t, root, comm)
