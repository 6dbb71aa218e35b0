"""Synchronous parameter server (thesis section 2.2.3 and Figure 2.12, after Li et al., OSDI'14) over
MPI point-to-point messages, with no torch.distributed at all.

One rank, the server, holds the master parameters and the optimizer state. Each training step every
worker pushes its gradients (and its learning rates) to the server and pulls the new parameters back;
the server averages the gradients of all workers, applies the optimizer step and sends the parameters
to every worker. This happens inside ``optimizer.step()``: :meth:`ParameterServer.wrap_optimizer`
returns the trainer's optimizer with its ``step`` replaced, so the training loop does not change.

``server="shared"``: rank 0 is the server and also a worker (its own gradient is one of the averaged
ones), so the run follows ring_allreduce's trajectory exactly. ``server="dedicated"``: the last rank
only serves. Its sampler is as long as a worker's shard but yields nothing (so the loader, the LR
policy and the progress bar count the workers' steps while the server computes no gradient); the
server serves the whole epoch inside ``end_epoch``, until every worker announces the end of its epoch,
then hands its optimizer state to rank 0, which writes the checkpoints. It takes part in validation
with the master parameters. The optimizer step is applied once per step at the server, with the
learning rate the workers sent.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn
from torch.utils.data import Sampler

from autocnnp.run.world import World

from .mpi_allreduce import bcast_module, mpi, pack_gradients
from .sharding import shard_sampler

TAG_GRAD, TAG_END, TAG_PARAMS, TAG_STATE = 101, 102, 103, 104


class ServingSampler(Sampler):
    """The dedicated server's sampler: the length of a worker's shard, but no samples."""

    def __init__(self, length: int):
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        return iter(())

    def set_epoch(self, epoch: int) -> None:
        """Nothing to shuffle."""


def wait_politely(requests, statuses, spin_s: float = 1e-3, nap_s: float = 2e-4) -> None:
    """Wait for all ``requests``: spin briefly, then poll with short sleeps. A server waiting a whole
    forward/backward for its workers then leaves the CPU to them (MPI's own waits busy-poll)."""
    MPI = mpi()
    start = time.perf_counter()
    while not MPI.Request.Testall(requests, statuses):
        if time.perf_counter() - start > spin_s:
            time.sleep(nap_s)


_CLASSES: dict[type, type] = {}


def _server_backed(base: type) -> type:
    """``base`` with ``step`` sending the step to the parameter server; the class keeps ``base``'s name,
    so checkpoints name the same optimiser as under other strategies (and resume across them)."""
    cls = _CLASSES.get(base)
    if cls is None:
        def step(self, closure=None):
            if closure is not None:
                raise ValueError("parameter_server: optimizer.step(closure) is not supported")
            self._autocnnp_ps.step(self, lambda: base.step(self))

        cls = _CLASSES[base] = type(base.__name__, (base,), {
            "step": step, "__module__": __name__,
            "__doc__": f"{base.__name__} whose steps are applied by the parameter server"})
    return cls


class ParameterServer:
    """Workers push gradients and pull parameters each step; the server averages, steps and sends."""

    def __init__(self, *, world: World, device: torch.device, server: str = "shared"):
        self.world, self.device, self.mode = world, device, server
        self.comm = mpi().COMM_WORLD
        size, rank = self.comm.size, self.comm.rank
        if server == "dedicated" and size < 2:
            raise ValueError("parameter_server server=dedicated needs at least 2 ranks (a server and a worker); "
                             "raise <parallelism-degree> or use server=shared")
        self.server = 0 if server == "shared" else size - 1
        self.workers = [r for r in range(size) if server == "shared" or r != self.server]
        self.is_server, self.is_worker = rank == self.server, rank in self.workers
        self.data_parallel_size = len(self.workers)  # replicas whose gradients make one step
        self.heartbeat = lambda: None  # the trainer hands its heartbeat over: a dedicated server blocks in end_epoch
        self.params: list[nn.Parameter] = []

    # --- generator protocol -------------------------------------------------------------------------

    def wrap(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        if self.comm.size > 1:
            bcast_module(model, self.server, self.comm)
        self.params = [p for p in model.parameters() if p.requires_grad]
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) != 1:
            raise ValueError(f"parameter_server needs parameters of one dtype, the model has {sorted(map(str, dtypes))}")
        return model

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
        dtype = self.params[0].dtype
        n = sum(p.numel() for p in self.params)
        item = torch.empty((), dtype=dtype).element_size()
        # message = [learning rates as float64 | flat gradients]; the header keeps the LRs exact
        self.header = math.ceil(8 * len(optimizer.param_groups) / item)
        self.message = torch.zeros(self.header + n, dtype=dtype)
        self.flat = torch.zeros(n, dtype=dtype)  # parameters sent back by the server
        others = [w for w in self.workers if w != self.comm.rank]
        self.inbox = {w: torch.zeros_like(self.message) for w in others} if self.is_server else {}
        base = type(optimizer)
        optimizer.__class__ = _server_backed(base)
        optimizer._autocnnp_ps = self
        self._apply = lambda: base.step(optimizer)  # the real optimizer step, run at the server
        self.optimizer = optimizer
        return optimizer

    def sampler(self, dataset, *, shuffle: bool, seed: int):
        index = self.workers.index(self.comm.rank) if self.is_worker else 0
        shard = shard_sampler(dataset, num_replicas=len(self.workers), rank=index, shuffle=shuffle, seed=seed)
        return shard if self.is_worker else ServingSampler(len(shard))

    def after_backward(self, model: nn.Module) -> None:
        """Nothing: gradients travel in ``optimizer.step()``."""

    def end_epoch(self, model: nn.Module) -> None:
        if self.mode == "dedicated":
            if self.is_server:
                while self._serve(own=False, apply=self._apply):
                    self.heartbeat()
                self.comm.send(self.optimizer.state_dict(), dest=0, tag=TAG_STATE)
            else:
                self.comm.Send(self.message[:1].numpy(), dest=self.server, tag=TAG_END)
                if self.comm.rank == 0:  # rank 0 writes checkpoints: it keeps a copy of the server's state
                    self.optimizer.load_state_dict(self.comm.recv(source=self.server, tag=TAG_STATE))
        if self.comm.size > 1:  # BatchNorm statistics follow rank 0 (a worker), as DDP's broadcast_buffers
            bcast_module(model, 0, self.comm, buffers_only=True)

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        return model

    # --- the exchange ------------------------------------------------------------------------------

    def step(self, optimizer: torch.optim.Optimizer, apply) -> None:
        """``optimizer.step()`` on a worker: push/pull, or, on a shared server, one serving round."""
        if self.comm.size == 1:
            apply()
        elif self.is_server:
            self._serve(own=True, apply=apply)
        else:
            self._pack(optimizer)
            self.comm.Send(self.message.numpy(), dest=self.server, tag=TAG_GRAD)
            self.comm.Recv(self.flat.numpy(), source=self.server, tag=TAG_PARAMS)
            self._unpack_params()

    def _pack(self, optimizer) -> None:
        lrs = self.message[:self.header].view(torch.float64)
        for i, group in enumerate(optimizer.param_groups):
            lrs[i] = float(group["lr"])
        pack_gradients(self.params, self.message[self.header:])

    def _unpack_params(self) -> None:
        offset = 0
        with torch.no_grad():
            for p in self.params:
                n = p.numel()
                p.copy_(self.flat[offset:offset + n].view_as(p))
                offset += n

    def _serve(self, *, own: bool, apply) -> bool:
        """One synchronous round at the server: receive every worker's gradients, average them, apply the
        optimizer step and send the parameters back. False when the workers ended their epoch instead."""
        MPI = mpi()
        senders = list(self.inbox)
        statuses = [MPI.Status() for _ in senders]
        requests = [self.comm.Irecv(self.inbox[w].numpy(), source=w, tag=MPI.ANY_TAG) for w in senders]
        wait_politely(requests, statuses)
        tags = {s.Get_tag() for s in statuses}
        if TAG_END in tags:
            if own or tags != {TAG_END}:
                raise RuntimeError("parameter_server: the workers disagree on the number of steps in the epoch")
            return False
        optimizer = self.optimizer
        if own:
            self._pack(optimizer)
            total = self.message
        else:
            total = self.inbox[senders[0]]
            lrs = total[:self.header].view(torch.float64)
            for i, group in enumerate(optimizer.param_groups):
                group["lr"] = float(lrs[i])
            senders = senders[1:]
        for w in senders:  # in rank order: deterministic sums
            total[self.header:] += self.inbox[w][self.header:]
        offset, count = self.header, len(self.workers)
        for p in self.params:
            n = p.numel()
            g = total[offset:offset + n].view_as(p).to(p.device)
            if p.grad is None:
                p.grad = g.div(count)
            else:
                p.grad.copy_(g).div_(count)
            offset += n
        apply()
        offset = 0
        for p in self.params:
            n = p.numel()
            self.flat[offset:offset + n].copy_(p.detach().reshape(-1))
            offset += n
        MPI.Request.Waitall([self.comm.Isend(self.flat.numpy(), dest=w, tag=TAG_PARAMS) for w in self.inbox])
        return True
