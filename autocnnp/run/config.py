"""Run-wide settings from ``<cluster>`` and ``<monitoring>`` (typed, torch-free)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


@dataclass
class ClusterConfig:
    """How run & manage starts the ranks."""

    launcher: Literal["auto", "mpirun", "inplace"] = "auto"
    hostfile: Path | None = field(default=None, metadata={"must_exist": True})
    mpirun_args: str = ""
    oversubscribe: bool = True
    rank_timeout_s: float = field(default=300.0, metadata={"min": 1.0})
    startup_timeout_s: float = field(default=120.0, metadata={"min": 1.0})


@dataclass
class MonitoringConfig:
    """What rank 0 reports and when a run is stopped as diverged."""

    progress: bool = True
    tensorboard: bool = True
    plots: bool = True
    sample_interval_s: float = field(default=2.0, metadata={"min": 0.1})
    stop_on_divergence: bool = True
    divergence_factor: float = field(default=1e3, metadata={"min": 1.0})
    log_every_steps: int = field(default=10, metadata={"min": 1})
