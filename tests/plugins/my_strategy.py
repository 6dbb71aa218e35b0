"""A user distributed optimizer: the default symbol is ``Strategy``."""


class Strategy:
    """Ring allreduce written by the user (never run by these tests)."""

    def __init__(self, *, world=None, device=None):
        self.world, self.device = world, device


class OtherStrategy(Strategy):
    """The same, picked with entry="OtherStrategy"."""
