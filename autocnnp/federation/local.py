"""A site's local training: the job's own run (training/run.py's build, loop.py's epochs), driven round by
round. A job of one rank trains in this process (:class:`SiteTrainer`); a job asking for more ranks trains
each round on them through run & manage's launcher, as ``autocnnp run`` would (:class:`LaunchedTrainer`):
federation across sites, ring-allreduce inside a site. :func:`site_trainer` chooses."""

from __future__ import annotations

import csv
import math

import numpy as np
import torch

from ..core.errors import ExitCode, JobError
from ..run import launch, preflight
from ..run.job import Job
from ..training.loop import data_card
from ..training.loop import evaluate as score
from .config import federation_of


def scalars(metrics: dict) -> dict[str, float]:
    """The finite numbers of ``metrics`` (what a site reports)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(float(v))}


def site_trainer(job: Job) -> SiteTrainer:
    """The site's trainer: in this process for a job of one rank, on the job's ranks otherwise."""
    if job.world_size == 1:
        return SiteTrainer(job)
    if federation_of(job).aggregation == "fedprox":
        raise JobError(job.spec.where, f"a site training on {job.world_size} ranks cannot add "
                       "FedProx's proximal term (its ranks train the job's own loss)",
                       "use aggregation fedavg, fedadam or fedyogi, or parallelism-degree=1 at this site")
    return LaunchedTrainer(job)


class SiteTrainer:
    """The job's run on this site, built once; each round loads the consensus, trains or scores it."""

    def __init__(self, job: Job):
        if job.generator.framework != "torch":
            raise JobError(job.spec.where, f"a federation trains torch networks, this job's framework is "
                           f"{job.generator.framework}", "use the torch framework")
        preflight.fetch_pretrained(job)
        self.job = job
        self.framework, self.run = job.build_run()
        self.model = self.run.strategy.unwrap(self.run.steps.model)
        self.loss_fn = self.run.steps.loss_fn

    def parameters(self) -> list[np.ndarray]:
        return [v.detach().cpu().numpy().copy() for v in self.model.state_dict().values()]  # not views of the network

    def names(self) -> list[str]:
        return list(self.model.state_dict())

    def load(self, arrays: list[np.ndarray]) -> None:
        own = self.model.state_dict()
        if len(arrays) != len(own):
            raise RuntimeError(f"the server sent {len(arrays)} tensors, this network has {len(own)}")
        self.model.load_state_dict({k: torch.as_tensor(a, dtype=v.dtype).reshape(v.shape)
                                    for (k, v), a in zip(own.items(), arrays, strict=True)})

    def card(self) -> dict:
        """The data's part of the model card (loop.py's ``data_card``): channels, classes, how a volume becomes
        the input."""
        return data_card(self.job.generator, self.run.data)

    def train(self, arrays, epochs: int, proximal_mu: float) -> dict[str, float]:
        """Train ``epochs`` epochs from ``arrays`` (the consensus); FedProx adds ``mu/2 |w - w_consensus|^2``."""
        self.load(arrays)
        run = self.run
        run.hp.end_epoch = run.state.epoch + epochs
        run.steps.loss_fn = self.proximal(proximal_mu) if proximal_mu > 0 else self.loss_fn
        return scalars(self.framework.fit(run, self.job.monitoring))

    def proximal(self, mu: float):
        anchor = [p.detach().clone() for p in self.model.parameters()]
        base = self.loss_fn

        def loss(logits, y):
            term = sum(((p - a) ** 2).sum() for p, a in zip(self.model.parameters(), anchor, strict=True))
            return base(logits, y) + mu / 2 * term
        return loss

    def evaluate(self, arrays) -> dict[str, float]:
        """The validation metrics of ``arrays`` on this site's validation samples."""
        self.load(arrays)
        run = self.run
        evaluator = run.task.evaluator(run.data.num_classes, run.data.class_names, run.regions)
        return scalars(score(self.model, run.valid_loader, evaluator, run.loss_fn, run.world))


class LaunchedTrainer(SiteTrainer):
    """A site whose job asks for several ranks. This process holds the network (one rank: the parameters, the
    validation); each round the job's ranks resume the site's own run from its latest checkpoint with the
    consensus as the network's weights (its optimizer, LR policy and epoch go on) and train ``epochs`` more,
    started and watched by run & manage (mpirun, or srun in a Slurm allocation; restarts as ``max_restarts``
    says)."""

    def __init__(self, job: Job):
        self.mode = launch.checked_mode(job)
        if self.mode == "inplace":
            raise JobError(job.where("launcher"), f"a site on {job.world_size} ranks starts them itself, and this "
                           "process runs in place (launcher=inplace, or under a launcher's rank variables)",
                           "start the site as one process, with launcher=mpirun, or srun inside a Slurm allocation")
        self.ranks_job = job.variant({"checkpoint.resume": "true"})  # the round's start is the checkpoint
        super().__init__(self.ranks_job.variant({"parallelism-degree": "1"}))

    def train(self, arrays, epochs: int, proximal_mu: float) -> dict[str, float]:
        checkpoints = self.run.checkpoints
        saved = checkpoints.load() or self.run.snapshot()  # the run so far, or its start
        self.load(arrays)
        saved["model"] = self.model.state_dict()
        checkpoints.save(saved, saved["epoch"] - 1)  # named by the epochs done, as the ranks name theirs
        job = self.ranks_job
        ranks = job.variant({"hyperparameters.end_epoch": str(saved["epoch"] + epochs)})
        code = launch.attempts(ranks, self.mode)
        if code != ExitCode.OK:
            raise RuntimeError(f"the site's {job.world_size} ranks ended with exit code {code} "
                               f"(their logs: {job.rundir.root})")
        trained = checkpoints.load()
        self.model.load_state_dict(trained["model"])
        self.run.state.epoch = trained["epoch"]
        with open(job.rundir.metrics, newline="") as f:
            last = list(csv.DictReader(f))[-1]
        return scalars({k: float(v) for k, v in last.items() if k != "epoch" and v not in ("", None)})
