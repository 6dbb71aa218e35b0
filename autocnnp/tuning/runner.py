"""The real runner of the guideline: train one job variant with run & manage, return its final metrics.

Each variant trains in its own folder, ``RUNS/<name>-<hash>`` (the hash covers the job file's text and
the variant's overrides), so an interrupted run resumes from its checkpoints when the tune is run
again, and a changed job or variant never resumes someone else's checkpoints.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import ExitCode, JobError
from ..core.metrics import SEGEVAL
from ..core.rundir import RunDir
from ..generator.overrides import read_variant
from ..run.job import load_job
from ..run.launch import parent_run, run
from ..run.manifest import final_metrics
from .guideline import Variant


class RunFailed(RuntimeError):
    """A run of the guideline ended without a result; ``exit_code`` is its own (an ExitCode)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class JobRunner:
    job: Path
    runs_dir: Path
    job_sha256: str
    base_overrides: dict[str, str] = field(default_factory=dict)

    def folder(self, variant: Variant) -> RunDir:
        text = json.dumps({"job": self.job_sha256, "base": self.base_overrides, "key": variant.key}, sort_keys=True)
        return RunDir(self.runs_dir / f"{variant.name}-{hashlib.sha256(text.encode()).hexdigest()[:8]}")

    def __call__(self, variant: Variant) -> dict:
        out = self.folder(variant)
        overrides = {**self.base_overrides, **variant.overrides, "output": str(out)}
        print(f"autocnnp tune: {variant.name} on {variant.world_size} rank(s) -> {out}", flush=True)
        with parent_run(self.runs_dir.parent):  # the tune folder: its iterations are children of one run
            code = run(load_job(read_variant(self.job, overrides)))
        if code == ExitCode.DIVERGED:  # a legitimate, very bad outcome
            return {**{m: 0.0 for m in SEGEVAL}, "diverged": 1.0}
        if code != 0:
            raise RunFailed(f"run {variant.name} failed with exit code {code} (see {out}); fix the cause and run "
                            "`autocnnp tune` again: it resumes where it stopped", code)
        metrics = final_metrics(out)
        if not metrics:
            raise JobError(out.metrics, "the run wrote no metrics.csv", "check the run's output")
        return metrics
