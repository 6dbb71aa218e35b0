"""Plot learning-rate schedules: a job's policy, or any registered policy with the job's lr, ranks and
epochs (``autocnnp lr-plot``). GreScale's feedback can only lengthen its warmup and lower its
stabilisation lr during a run, so the plot shows its plan; ``--metrics`` adds the lr a run really used."""

from __future__ import annotations

import csv
import math
from pathlib import Path

ASSUMED_STEPS = 10


def steps_per_epoch(gen, world_size: int) -> int | None:
    """Optimizer steps per epoch when the dataset size is known without loading it (synthetic data)."""
    config = gen.action("dataset_injection").config
    n = getattr(config, "train_samples", None)
    if not n:
        return None
    per_rank = math.ceil(n / world_size)  # DistributedSampler pads to equal shards
    return max(1, per_rank // gen.hyperparameters.minibatch_size)


def build_policy(gen, name: str | None = None, world_size: int | None = None, steps: int = ASSUMED_STEPS):
    """The job's LR policy (or the registered policy ``name`` with its defaults), built like the trainer does."""
    from ..engine.values import bind, describe
    from ..generator.registry import LR_POLICIES

    action = gen.action("lr_policy")
    if name is None or name == action.entry.name:
        impl = action.entry.load()
        params = action.params(impl)
    else:
        entry = LR_POLICIES.get(name, gen.job.where)
        impl = entry.load()
        params = describe(bind(entry.config, [], gen.job.base_dir, f"lr_policy '{name}'"))
    hp = gen.hyperparameters
    return impl(base_lr=hp.lr, world_size=world_size or gen.degree, steps_per_epoch=steps,
                total_epochs=hp.end_epoch, **params)


def actual_lr(metrics_csv: Path) -> list[tuple[float, float]]:
    """(epoch index, lr of the epoch's last step) from a run's metrics.csv."""
    with open(metrics_csv, newline="") as f:
        return [(int(r["epoch"]), float(r["lr"])) for r in csv.DictReader(f) if r.get("lr")]


def plot_schedules(policies: dict[str, object], total_epochs: int, steps: int, out: Path, title: str,
                   actual: list[tuple[float, float]] | None = None, log: bool = False) -> Path:
    from autocnnp.components.training.lr_policies import schedule

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (name, policy) in enumerate(policies.items()):
        points = schedule(policy, total_epochs, steps)
        ax.plot([e for e, _ in points] + [total_epochs], [lr for _, lr in points] + [points[-1][1]],
                color=f"C{i}", label=name, drawstyle="steps-post")
        if hasattr(policy, "decay_start"):  # GreScale: mark its three stages
            warm, decay = policy.warmup_epochs, total_epochs - policy.decay_epochs
            for x, text in ((warm, "stabilisation"), (decay, "decay")):
                if 0 < x < total_epochs:
                    ax.axvline(x, color=f"C{i}", ls=":", lw=1)
                    ax.text(x, ax.get_ylim()[1], f" {text}", color=f"C{i}", fontsize=7, va="top")
    if actual:
        ax.plot([e + 1 - 0.5 / steps for e, _ in actual], [lr for _, lr in actual], "kx",
                label="used by the run (last step of each epoch)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("learning rate")
    if log:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, out)


def save_figure(fig, path: Path) -> Path:
    """Lay out ``fig``, write it to ``path`` (creating its folder) at the tuning plots' 110 dpi and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
