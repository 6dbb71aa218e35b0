"""autocnnp-demo-plugin: a dist_strategy shipped by a separate distribution (torch-free stub)."""

from dataclasses import dataclass


class Strategy:
    """A third-party ring strategy found through the autocnnp.dist_strategy entry-point group."""

    @dataclass
    class Config:
        chunks: int = 2

    requires = {"communication_init": ("torch_distributed",)}
    launchers = ("mpirun", "inplace")

    def __init__(self, *, world=None, device=None, chunks: int = 2):
        self.world, self.device, self.chunks = world, device, chunks
