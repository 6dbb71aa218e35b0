"""``tracker=files`` (the default): TensorBoard events and PNG plots in the run folder."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass

from autocnnp.core.files import writing
from autocnnp.core.rundir import RunDir
from autocnnp.core.settings import setting
from autocnnp.generator.protocols import RunInfo, Tracker
from autocnnp.generator.registry import component

# TensorBoard imports TensorFlow where it is installed unless this module exists (its own switch)
NO_TENSORFLOW = "tensorboard.compat.notf"


@dataclass
class Config:
    """TensorBoard and plots in the run folder (metrics.csv is written by every run, whatever the trackers)."""

    tensorboard: bool = setting(True, help="TensorBoard events in OUTPUT/tensorboard")
    plots: bool = setting(True, help="PNG plots in OUTPUT/plots when the run ends")


@component("files", frameworks=("torch", "tensorflow"))
class Files(Tracker):
    """TensorBoard events (the step loss and every epoch metric) and PNG plots when the run ends."""

    def __init__(self, config: Config, *, info: RunInfo):
        super().__init__(config, info=info)
        self.writer = None
        if config.tensorboard:
            if "tensorflow" not in sys.modules:  # a torch job: TensorBoard's stub, not TensorFlow (seconds to import)
                sys.modules.setdefault(NO_TENSORFLOW, types.ModuleType(NO_TENSORFLOW))
            from torch.utils.tensorboard import SummaryWriter

            self.events = RunDir(info.rundir).tensorboard
            with writing(self.events):
                self.writer = SummaryWriter(str(self.events),  # a resumed run drops the events after it
                                            purge_step=info.first_step + 1 if info.first_step else None)

    def step(self, global_step: int, loss: float) -> None:
        if self.writer is not None:
            with writing(self.events):
                self.writer.add_scalar("train/loss_step", loss, global_step)

    def epoch_end(self, epoch: int, metrics: dict[str, float], global_step: int) -> None:
        if self.writer is not None:
            with writing(self.events):
                for name, value in metrics.items():
                    self.writer.add_scalar(f"metrics/{name}", value, global_step)
                self.writer.flush()

    def close(self, status: str) -> None:
        if self.writer is not None:
            with writing(self.events):
                self.writer.close()
        if self.config.plots:
            from autocnnp.training.monitor import plot_run

            plot_run(RunDir(self.info.rundir))
