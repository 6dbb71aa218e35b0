"""Plot learning-rate schedules: a job's policy, or any registered policy with the job's lr, ranks and
epochs (``autocnnp lr-plot``). GreScale's feedback can only lengthen its warmup and lower its
stabilisation lr during a run, so the plot shows its plan; ``--metrics`` adds the lr a run really used."""

from __future__ import annotations

import csv
from pathlib import Path

from ..core.metrics import LEARNING_RATE

ASSUMED_STEPS = 10


def steps_per_epoch(gen, world_size: int) -> int | None:
    """Optimizer steps per epoch when the data format knows its training samples without reading them."""
    n = gen.data_format().train_samples()
    return max(1, gen.steps_per_epoch(n, world_size)) if n else None


def schedule(policy, total_epochs: int, steps_per_epoch: int) -> list[tuple[float, float]]:
    """``(epoch + step / steps_per_epoch, lr)`` for every step of the run."""
    return [(epoch + step / steps_per_epoch, policy.lr(epoch, step))
            for epoch in range(total_epochs) for step in range(steps_per_epoch)]


def actual_lr(metrics_csv: Path) -> list[tuple[float, float]]:
    """(epoch index, lr of the epoch's last step) from a run's metrics.csv."""
    with open(metrics_csv, newline="") as f:
        rows = csv.DictReader(f)
        return [(int(r["epoch"]) - 1, float(r[LEARNING_RATE])) for r in rows if r.get(LEARNING_RATE)]  # numbered from 1


def plot_schedules(policies: dict[str, object], total_epochs: int, steps: int, out: Path, title: str,
                   actual: list[tuple[float, float]] | None = None, log: bool = False) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (name, policy) in enumerate(policies.items()):
        points = schedule(policy, total_epochs, steps)
        ax.plot([e for e, _ in points] + [total_epochs], [lr for _, lr in points] + [points[-1][1]],
                color=f"C{i}", label=name, drawstyle="steps-post")
        for x, text in policy.stages():  # where a stage of the schedule starts (GreScale's three)
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
