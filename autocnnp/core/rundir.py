"""The output folder of a run: every path in it is named here, once.

::

    OUTPUT/manifest.json        the reproducibility record (run/manifest.py)
    OUTPUT/metrics.csv          one row per epoch (training/monitor.py)
    OUTPUT/checkpoints/         written by the checkpoint action (latest, ckpt-epochNNNN.pt, ckpt-best.pt, best)
    OUTPUT/cache/               slice caches and data-check stamps of the dataset
    OUTPUT/cache/pretrained/    the zoo model a job starts from (NAME-VERSION/checkpoint.pt), fetched before the ranks start
    OUTPUT/plots/               PNG plots (learning curves, metrics, resources, lr schedule)
    OUTPUT/tensorboard/         TensorBoard events
    OUTPUT/resources/rankN.csv  per-rank CPU, memory and GPU samples
    OUTPUT/tracking/            a tracker's journal and state (the mlflow tracker), the plan it logged
    OUTPUT/predictions/         label volumes written by ``autocnnp predict``
    OUTPUT/export/              ``autocnnp export``: model.onnx, model.int8.onnx, model.torchscript.pt, model.json
    OUTPUT/slurm/               sbatch scripts, job.json (the submitted job), <id>.exit
    OUTPUT/tune/                ``autocnnp tune``: its runs, table, plot and state
    OUTPUT/seed-S/              one run of ``autocnnp run --repeat K`` (a run folder itself)
    OUTPUT/repeats.csv          the summary of the repeats
    OUTPUT/fold-F/              one fold of ``autocnnp study`` (a run folder itself)
    OUTPUT/folds.json           the study's k-fold split (written once, reused by every fold)
    OUTPUT/folds.csv            the summary of the folds
    OUTPUT/logs/rankN.log       what each rank printed
    OUTPUT/.ranks/rankN         rank status files (their mtime is the rank's heartbeat)
    OUTPUT/.stop                a request to the ranks: stop at the end of the epoch with a checkpoint
    OUTPUT/.swarm/              rendezvous of a Docker swarm run
    OUTPUT/.lock                held by the run that owns the folder (its holder inside)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# In a checkpoints folder: the file naming the newest checkpoint, the best checkpoint and its record
LATEST_POINTER, BEST_CHECKPOINT, BEST_RECORD = "latest", "ckpt-best.pt", "best"
# The checkpoint in the folder of a model fetched from the zoo (tracking/zoo.py)
ZOO_CHECKPOINT = "checkpoint.pt"
# The model card ``autocnnp export`` writes beside the exported models (export.py), read by predict and the zoo
EXPORT_CARD = "model.json"


def zoo_folder(folder: Path, name: str, version: int | None) -> Path:
    """The folder in ``folder`` that zoo model ``name`` (``version``, else its latest) is fetched into."""
    return folder / f"{name}-{version or 'latest'}"


def start_checkpoint(folder: Path) -> Path | None:
    """The checkpoint a run (or checkpoints) folder offers to start from: its best, else the one its ``latest``
    pointer names; None when it has neither."""
    run = RunDir(folder)
    folder = run.checkpoints if run.checkpoints.is_dir() else folder
    if (folder / BEST_CHECKPOINT).is_file():
        return folder / BEST_CHECKPOINT
    return _pointed(folder / LATEST_POINTER)


def checkpoint_file(path: Path) -> Path:
    """The checkpoint file ``path`` names: a run or checkpoints folder's :func:`start_checkpoint`, the file a
    ``latest`` pointer names, the best checkpoint beside a ``best`` record, else ``path`` itself (which the
    caller checks)."""
    if path.is_dir():
        return start_checkpoint(path) or path
    if path.name == LATEST_POINTER:
        return _pointed(path) or path
    if path.name == BEST_RECORD and (path.parent / BEST_CHECKPOINT).is_file():
        return path.parent / BEST_CHECKPOINT
    return path


def _pointed(pointer: Path) -> Path | None:
    """The checkpoint a small ``latest`` pointer file names, when both exist."""
    try:
        if not pointer.is_file() or pointer.stat().st_size > 4096:
            return None
        name = pointer.read_text(errors="replace").strip()
    except OSError:
        return None
    target = pointer.parent / name
    return target if name and "/" not in name and target.is_file() else None


@dataclass(frozen=True)
class RunDir:
    """The paths of one run's output folder (nothing is created until someone writes)."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    def __fspath__(self) -> str:
        return str(self.root)

    def __str__(self) -> str:
        return str(self.root)

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def tracking(self) -> Path:
        return self.root / "tracking"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    def pretrained(self, name: str, version: int | None) -> Path:
        """Where run & manage fetches zoo model ``name`` (``version``, else its latest) that the job starts from."""
        return zoo_folder(self.cache / "pretrained", name, version)

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def resources(self) -> Path:
        return self.root / "resources"

    def resource_samples(self, rank: int) -> Path:
        return self.resources / f"rank{rank}.csv"

    def all_resource_samples(self) -> list[Path]:
        """The resource samples of every rank that wrote some, in name order."""
        return sorted(self.resources.glob("rank*.csv"))

    @property
    def predictions(self) -> Path:
        return self.root / "predictions"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def slurm(self) -> Path:
        return self.root / "slurm"

    @property
    def slurm_record(self) -> Path:
        return self.slurm / "job.json"

    def slurm_exit(self, job_id: str) -> Path:
        return self.slurm / f"{job_id}.exit"

    @property
    def tune(self) -> Path:
        return self.root / "tune"

    def seed(self, seed: int) -> RunDir:
        """The run folder of one seed of ``autocnnp run --repeat``."""
        return RunDir(self.root / f"seed-{seed}")

    @property
    def repeats(self) -> Path:
        return self.root / "repeats.csv"

    def fold(self, fold: int) -> RunDir:
        """The run folder of one fold of ``autocnnp study``."""
        return RunDir(self.root / f"fold-{fold}")

    @property
    def folds_split(self) -> Path:
        return self.root / "folds.json"

    @property
    def folds_summary(self) -> Path:
        return self.root / "folds.csv"

    @property
    def ranks(self) -> Path:
        return self.root / ".ranks"

    def rank_status(self, rank: int) -> Path:
        return self.ranks / f"rank{rank}"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def rank_log(self, rank: int) -> Path:
        return self.logs / f"rank{rank}.log"

    @property
    def stop_request(self) -> Path:
        return self.root / ".stop"

    @property
    def swarm(self) -> Path:
        return self.root / ".swarm"

    @property
    def areas(self) -> tuple[Path, ...]:
        """Every folder of the layout above (the seed-S folders of a repeat set aside)."""
        return (self.checkpoints, self.cache, self.plots, self.tensorboard, self.resources, self.tracking,
                self.predictions, self.export, self.slurm, self.tune, self.logs, self.ranks, self.swarm)

    def keeps_runs_in(self, name: str) -> bool:
        """Whether the entry ``name`` of this folder holds runs of this run's own: its ``tune/`` iterations and
        the ``seed-S/`` runs of ``run --repeat``, the ``fold-F/`` runs of ``study``."""
        return name == self.tune.name or re.fullmatch(r"(seed-(-?\d+)|fold-\d+)", name) is not None

    def owns(self, name: str) -> bool:
        """Whether the entry ``name`` of this folder is one of the run's own (its layout)."""
        return self.keeps_runs_in(name) or any(name == area.name for area in self.areas)

    @property
    def folders(self) -> tuple[Path, ...]:
        """The folders a run writes in (each created on first use)."""
        return (self.checkpoints, self.cache, self.logs, self.ranks, self.plots, self.predictions)

    @property
    def lock(self) -> Path:
        return self.root / ".lock"
