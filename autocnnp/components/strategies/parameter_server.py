"""Synchronous parameter server (thesis section 2.2.3 and Figure 2.12, after Li et al., OSDI'14) over
MPI point-to-point messages, with no torch.distributed at all.

One rank, the server, holds the master parameters and the optimizer state. Each training step every
worker pushes its gradients (and its learning rates) to the server and pulls the new parameters back;
the server averages the gradients of all workers, applies the optimizer step and sends the parameters
to every worker. This happens in the strategy's ``step`` hook, where other strategies step the optimizer.

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
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from autocnnp.core.settings import setting
from autocnnp.generator.protocols import MPI_LAUNCHERS, Strategy, StrategyConfig, Traffic, collective_wait, shard_sampler
from autocnnp.generator.registry import component

from .tensors import bcast_module, mpi, pack, unpack

TAG_GRAD, TAG_END, TAG_PARAMS, TAG_STATE = 101, 102, 103, 104


@dataclass
class Config(StrategyConfig):
    server: Literal["shared", "dedicated"] = setting(
        "shared", help="shared: rank 0 serves and trains; dedicated: the last rank only serves")

    def replicas(self, world_size: int) -> int:
        return world_size - 1 if self.server == "dedicated" and world_size > 1 else world_size

    def shards(self, world_size: int) -> int:
        return self.replicas(world_size)  # the workers' shards: a dedicated server reads no data


class ServingSampler:
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


@component("parameter_server")
class ParameterServer(Strategy):
    """Synchronous parameter server over MPI: workers push gradients, pull parameters (server: shared = rank 0
    also trains, dedicated = last rank only serves)."""

    requires = {"communication_init": ("mpi4py",)}
    launchers = MPI_LAUNCHERS

    def __init__(self, config: Config, **runtime):
        super().__init__(config, **runtime)
        self.comm = mpi().COMM_WORLD
        size, rank = self.comm.size, self.comm.rank
        if config.server == "dedicated" and size < 2:
            raise ValueError("parameter_server server=dedicated needs at least 2 ranks (a server and a worker); "
                             "raise <parallelism-degree> or use server=shared")
        self.server = 0 if config.server == "shared" else size - 1
        self.workers = [r for r in range(size) if config.server == "shared" or r != self.server]
        self.is_server, self.is_worker = rank == self.server, rank in self.workers
        self.params: list[nn.Parameter] = []

    # --- the strategy protocol ----------------------------------------------------------------------

    @classmethod
    def traffic(cls, config: Config, *, grad_bytes: int, model_bytes: int, world_size: int, steps_per_epoch: int) -> Traffic:
        """Every step each rank but the server pushes its gradients through the server's link and pulls the
        parameters back (as many bytes), after the backward pass: nothing overlaps."""
        del model_bytes, steps_per_epoch
        return Traffic("server", grad_bytes, config.replicas(world_size), overlap=0.0)

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
        self.optimizer = optimizer
        return optimizer

    def sampler(self, dataset, *, shuffle: bool, seed: int):
        index = self.workers.index(self.comm.rank) if self.is_worker else 0
        shard = shard_sampler(dataset, num_replicas=len(self.workers), rank=index, shuffle=shuffle, seed=seed)
        return shard if self.is_worker else ServingSampler(len(shard))

    def step(self, optimizer: torch.optim.Optimizer, scaler) -> None:
        """A worker pushes its gradients and pulls the parameters; a shared server serves one round."""
        if self.comm.size == 1:
            optimizer.step()
        elif self.is_server:
            self._serve(own=True)
        else:
            self._pack()
            with collective_wait.blocking():
                self.comm.Send(self.message.numpy(), dest=self.server, tag=TAG_GRAD)
                self.comm.Recv(self.flat.numpy(), source=self.server, tag=TAG_PARAMS)
            unpack(self.flat, self.params)

    def end_epoch(self, model: nn.Module) -> None:
        if self.config.server == "dedicated":
            if self.is_server:
                while self._serve(own=False):
                    self.beat()
                self.comm.send(self.optimizer.state_dict(), dest=0, tag=TAG_STATE)
            else:
                self.comm.Send(self.message[:1].numpy(), dest=self.server, tag=TAG_END)
                if self.comm.rank == 0:  # rank 0 writes checkpoints: it keeps a copy of the server's state
                    self.optimizer.load_state_dict(self.comm.recv(source=self.server, tag=TAG_STATE))
        if self.comm.size > 1:  # BatchNorm statistics follow rank 0 (a worker), as DDP's broadcast_buffers
            bcast_module(model, 0, self.comm, buffers_only=True)

    # --- the exchange ------------------------------------------------------------------------------

    def _pack(self) -> None:
        lrs = self.message[:self.header].view(torch.float64)
        for i, group in enumerate(self.optimizer.param_groups):
            lrs[i] = float(group["lr"])
        pack(self.params, self.message[self.header:], grads=True)

    def _serve(self, *, own: bool) -> bool:
        """One synchronous round at the server: receive every worker's gradients, average them, apply the
        optimizer step and send the parameters back. False when the workers ended their epoch instead."""
        MPI = mpi()
        senders = list(self.inbox)
        statuses = [MPI.Status() for _ in senders]
        requests = [self.comm.Irecv(self.inbox[w].numpy(), source=w, tag=MPI.ANY_TAG) for w in senders]
        with collective_wait.blocking():
            wait_politely(requests, statuses)
        tags = {s.Get_tag() for s in statuses}
        if TAG_END in tags:
            if own or tags != {TAG_END}:
                raise RuntimeError("parameter_server: the workers disagree on the number of steps in the epoch")
            return False
        if own:
            self._pack()
            total = self.message
        else:
            total = self.inbox[senders[0]]
            lrs = total[:self.header].view(torch.float64)
            for i, group in enumerate(self.optimizer.param_groups):
                group["lr"] = float(lrs[i])
            senders = senders[1:]
        for w in senders:  # in rank order: deterministic sums
            total[self.header:] += self.inbox[w][self.header:]
        unpack(total[self.header:], self.params, grads=True, divisor=len(self.workers))
        self.optimizer.step()
        pack(self.params, self.flat)
        with collective_wait.blocking():
            MPI.Request.Waitall([self.comm.Isend(self.flat.numpy(), dest=w, tag=TAG_PARAMS) for w in self.inbox])
        return True
