"""Run monitoring: divergence guard, resource and step-time sampling, progress, metrics.csv, the trackers.

Epochs and steps are 0-based indices in the API and shown 1-based in messages. The ``<monitoring>``
section binds :class:`MonitoringConfig`, which ``autocnnp validate`` reads: the monitors' heavy
modules (torch, psutil, tqdm, TensorBoard, matplotlib) are imported when a monitor is built.
"""

from __future__ import annotations

import csv
import io
import math
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..core.files import WriteRefused, append_text, atomic_write
from ..core.metrics import FOREGROUND_DICE, SEGEVAL, parse_regions
from ..core.rundir import RunDir
from ..core.settings import setting
from ..generator.protocols import collective_wait


@dataclass
class MonitoringConfig:
    """``<monitoring>``: what rank 0 reports and when a run is stopped as diverged."""

    progress: bool = setting(True, help="progress bar on a terminal")
    tracker: str = setting("files", help="where the run's events go besides metrics.csv, comma-separated: files "
                                         "(TensorBoard, plots), mlflow")
    sample_interval_s: float = setting(2.0, min=0.1, help="seconds between resource samples of each rank")
    stop_on_divergence: bool = setting(True, help="stop when the loss becomes non-finite or explodes")
    divergence_factor: float = setting(1e3, min=1.0, help="'explodes': above this x the first loss")
    log_every_steps: int = setting(10, min=1, help="TensorBoard step-loss interval")
    data_checksum: Literal["auto", "content", "stat", "none"] = setting(
        "auto", help="manifest.json's dataset checksum: content (sha256 of the files), stat (names, sizes, "
                     "mtimes), auto (content up to 512 MiB, else stat) or none")
    regions: str = setting("auto", help="Dice of groups of classes: auto (the BraTS regions for brain-tumour "
                                        "labels), none, or NAME=1,2,3; NAME=2,3")

    def __post_init__(self):
        parse_regions(self.regions)  # the syntax now; the class values once the data is known

RESOURCE_COLUMNS = ("time_s", "rank", "cpu_percent", "rss_mb", "gpu_util_percent", "gpu_mem_mb", "step_ms",
                    "data_wait_ms", "host", "collective_wait_ms")


class Diverged(RuntimeError):
    """Training loss became non-finite or exploded; carries ``epoch``, ``step`` and ``loss``."""

    def __init__(self, message: str, epoch: int, step: int, loss: float) -> None:
        super().__init__(message)
        self.epoch, self.step, self.loss = epoch, step, loss


class StragglerWatch:
    """Flags a rank whose own work per step (compute and data wait: its step time less the time blocked in the
    strategy's collectives) stays above ``factor`` x the ranks' median for ``epochs`` epochs in a row
    (once per such stretch). The median is a rank's own time (the lower middle one of an even number of ranks):
    with two ranks, the faster one's."""

    def __init__(self, factor: float = 1.5, epochs: int = 2) -> None:
        self.factor, self.epochs = factor, epochs
        self.stretch: dict[int, int] = {}

    def update(self, step_s: list[float]) -> list[tuple[int, float, float]]:
        """(rank, its own work per step, the median) of the ranks flagged at this epoch, from every rank's."""
        import statistics  # here: with decimal and fractions it costs `autocnnp validate` ~8 ms

        median = statistics.median_low(step_s) if len(step_s) > 1 else 0.0
        flagged = []
        for rank, seconds in enumerate(step_s):
            above = median > 0 and seconds > self.factor * median
            self.stretch[rank] = self.stretch.get(rank, 0) + 1 if above else 0
            if self.stretch[rank] == self.epochs:
                flagged.append((rank, seconds, median))
        return flagged


class StopRequested(Exception):
    """Training stopped on request at the end of an epoch, with a checkpoint (Slurm's time-limit warning)."""


class DivergenceGuard:
    """Raises :class:`Diverged` on a NaN/inf loss or one above ``factor`` x the first finite loss.

    Check a loss that is identical on every rank (e.g. all-reduced) so all ranks stop together.
    The explosion test needs a positive reference loss.
    """

    def __init__(self, factor: float, enabled: bool = True) -> None:
        if factor <= 0:
            raise ValueError(f"divergence factor must be > 0, got {factor}")
        self.factor = factor
        self.enabled = enabled
        self.reference: float | None = None

    def check(self, loss: float, epoch: int, step: int) -> None:
        """Record the reference on the first finite loss; raise if this loss diverged."""
        if not self.enabled:
            return
        loss = float(loss)
        if not math.isfinite(loss):
            reason = f"loss is {loss} (not finite)"
        elif self.reference is None:
            self.reference = loss
            return
        elif self.reference > 0 and loss > self.factor * self.reference:
            reason = (
                f"loss {loss:.6g} exceeds {self.factor:g} x the initial loss {self.reference:.6g}"
            )
        else:
            return
        raise Diverged(
            f"Training diverged at epoch {epoch + 1}, step {step + 1}: {reason}. "
            "Try a lower learning rate or a longer warmup, or set "
            '<monitoring><property name="stop_on_divergence">false</property></monitoring> '
            "to keep training regardless.",
            epoch,
            step,
            loss,
        )


class ResourceSampler:
    """Daemon thread appending rows of ``RESOURCE_COLUMNS``: CPU, RSS, GPU, and the mean step time, time waiting
    for data and time blocked in collectives of the steps since the last row (:meth:`record_step`).

    ``time_s`` is Unix time. One row is taken at :meth:`start` and one at :meth:`stop`.
    With ``append=False`` an existing file is replaced.
    """

    def __init__(self, path: Path, rank: int, interval_s: float, append: bool = True) -> None:
        if interval_s <= 0:
            raise ValueError(f"sample interval must be > 0 s, got {interval_s}")
        import psutil
        import torch

        self.path = Path(path)
        self.rank = rank
        self.interval_s = interval_s
        self.append = append
        self._process = psutil.Process()
        self._cuda = torch.cuda if torch.cuda.is_available() else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = False
        self.failed: WriteRefused | None = None  # a row the filesystem refused: sampling ended there
        self._host = os.uname().nodename  # socket.gethostname()'s, without importing socket for validate
        self._steps = [0, 0.0, 0.0, 0.0]  # steps; seconds in steps, waiting for data, in collectives: since the last row

    def record_step(self, step_s: float, data_wait_s: float, collective_s: float = 0.0) -> None:
        """Count one optimizer step and the parts of it spent waiting for the next batch and in collectives."""
        steps = self._steps
        steps[:] = steps[0] + 1, steps[1] + step_s, steps[2] + data_wait_s, steps[3] + collective_s

    def start(self) -> ResourceSampler:
        """Start the CSV (its header if new), take a first sample and start the thread (no-op if started)."""
        if self._started or self._stop.is_set():
            return self
        fresh = not self.append or not self.path.exists() or self.path.stat().st_size == 0
        if fresh:
            atomic_write(self.path, _csv_line(RESOURCE_COLUMNS))
        self._started = True
        self._process.cpu_percent(None)  # prime: the first call always reports 0
        self._sample(cpu=False)  # a CPU share over no time yet is noise (thousands of %)
        self._thread = threading.Thread(
            target=self._run, name=f"resource-sampler-rank{self.rank}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread, take a last sample and close the file (idempotent)."""
        if self._stop.is_set():
            return
        self._stop.set()
        if not self._started:
            return
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s) and self.failed is None:
            self._sample()

    def _sample(self, cpu: bool = True) -> None:
        gpu_util = gpu_mem = ""
        if self._cuda:
            try:
                gpu_util = f"{self._cuda.utilization():.0f}"
            except Exception:  # needs pynvml / NVML; leave the column empty without it
                pass
            gpu_mem = f"{self._cuda.memory_allocated() / 2**20:.1f}"
        (n, step_s, wait_s, collective_s), self._steps = self._steps, [0, 0.0, 0.0, 0.0]
        row = _csv_line(
            (
                f"{time.time():.3f}",
                self.rank,
                f"{self._process.cpu_percent(None):.1f}" if cpu else "",
                f"{self._process.memory_info().rss / 2**20:.1f}",
                gpu_util,
                gpu_mem,
                f"{1000 * step_s / n:.2f}" if n else "",
                f"{1000 * wait_s / n:.2f}" if n else "",
                self._host,
                f"{1000 * collective_s / n:.2f}" if n else "",
            )
        )
        if self.failed is None:
            try:
                append_text(self.path, row)
            except WriteRefused as exc:  # the monitor raises it at the epoch's end
                self.failed = exc

    def __enter__(self) -> ResourceSampler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Monitor:
    """Per-rank run monitor: resource and step-time sampling everywhere; progress, the console line,
    metrics.csv and the trackers (TensorBoard, plots, MLflow: components/trackers/) on rank 0.

    Tracker steps are optimizer steps (``epoch * steps_per_epoch + step + 1``); epoch metrics are
    reported at the last step of their epoch. metrics.csv numbers epochs from 1, as the console does.
    On resume the metrics.csv rows of the epochs after ``start_epoch`` (the epochs done) are dropped.
    The console line gives the share of the epoch's step time spent waiting for data.
    """

    def __init__(self, rundir: RunDir, rank: int, world_size: int, config: MonitoringConfig, total_epochs: int,
                 steps_per_epoch: int, start_epoch: int, trackers=()) -> None:
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        from tqdm import tqdm

        self.rundir = rundir
        self.rank = rank
        self.world_size = world_size
        self.config = config
        self.total_epochs = total_epochs
        self.steps_per_epoch = steps_per_epoch
        self.start_epoch = start_epoch
        self.metrics_path = rundir.metrics
        self.trackers = list(trackers)
        self.stragglers = StragglerWatch()
        self.last_step = (0.0, 0.0, 0.0)  # the last step's seconds: all of it, waiting for data, in collectives
        self._closed = False
        self._bar = None
        self._columns: list[str] | None = None
        self._reset_epoch_counters()
        self._sampler = ResourceSampler(rundir.resource_samples(rank), rank, config.sample_interval_s,
                                        append=start_epoch > 0).start()
        if rank != 0:
            return
        rundir.root.mkdir(parents=True, exist_ok=True)
        self._truncate_metrics()
        self._write_line = tqdm.write
        self._bar = tqdm(
            total=total_epochs * steps_per_epoch,
            initial=start_epoch * steps_per_epoch,
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
            disable=None if config.progress else True,  # None: off when not a TTY
        )

    def _reset_epoch_counters(self) -> None:
        self._epoch_t0 = self._last_step_t = time.perf_counter()
        self._epoch_samples = self._epoch_steps = 0
        self._epoch_step_s = self._epoch_wait_s = self._epoch_collective_s = 0.0
        self._collective_mark = collective_wait.seconds

    def mean_step_s(self) -> float:
        """This rank's own work per step in the epoch so far (every rank): its mean step time less the time
        blocked in the strategy's collectives, where a synchronous exchange makes every rank wait for the slowest."""
        own = self._epoch_step_s - self._epoch_collective_s
        return own / self._epoch_steps if self._epoch_steps else 0.0

    def _truncate_metrics(self) -> None:
        """Keep only the metrics.csv rows of the ``start_epoch`` epochs done."""
        if not self.metrics_path.exists():
            return
        columns, rows = _read_csv(self.metrics_path)
        kept = [row for row in rows if int(row["epoch"]) <= self.start_epoch]
        if not kept:
            self.metrics_path.unlink()
            return
        self._columns = columns
        _write_csv(self.metrics_path, columns, kept)

    def step(self, epoch: int, step: int, loss: float, samples: int, step_s: float = 0.0,
             data_wait_s: float = 0.0) -> None:
        """Record one optimizer step: ``samples`` is this rank's batch size, ``step_s`` the step's time and
        ``data_wait_s`` the part of it spent waiting for the batch (sampled on every rank); the part blocked in
        the strategy's collectives since the last step is read from ``collective_wait``."""
        collective_s = min(collective_wait.seconds - self._collective_mark, step_s)
        self._collective_mark = collective_wait.seconds
        self.last_step = (step_s, data_wait_s, collective_s)
        self._sampler.record_step(step_s, data_wait_s, collective_s)
        self._epoch_steps += 1
        self._epoch_step_s += step_s
        self._epoch_wait_s += data_wait_s
        self._epoch_collective_s += collective_s
        if self.rank != 0 or self._closed:
            return
        now = time.perf_counter()
        self._last_step_t = now
        self._epoch_samples += samples * self.world_size
        loss = float(loss)
        self._bar.set_postfix(
            epoch=f"{epoch + 1}/{self.total_epochs}",
            loss=f"{loss:.4g}",
            samples_s=f"{self._throughput():.1f}",
            refresh=False,
        )
        self._bar.update(1)
        global_step = epoch * self.steps_per_epoch + step + 1
        if global_step % self.config.log_every_steps == 0:
            for tracker in self.trackers:
                tracker.step(global_step, loss)

    def _throughput(self) -> float:
        elapsed = self._last_step_t - self._epoch_t0
        return self._epoch_samples / elapsed if elapsed > 0 else 0.0

    def epoch_end(self, epoch: int, metrics: dict[str, float], rank_step_s: list[float] = ()) -> None:
        """Append the epoch's metrics to metrics.csv and TensorBoard; print a summary line; flag a straggler
        from every rank's own work per step (``rank_step_s``, rank order: :meth:`mean_step_s`)."""
        if self._sampler.failed is not None:
            raise self._sampler.failed
        if self.rank != 0 or self._closed:
            self._reset_epoch_counters()
            return
        metrics = {name: float(value) for name, value in metrics.items()}
        self._append_metrics(epoch, metrics)
        for tracker in self.trackers:
            tracker.epoch_end(epoch, metrics, (epoch + 1) * self.steps_per_epoch)
        waiting = self._epoch_wait_s / self._epoch_step_s if self._epoch_step_s > 0 else 0.0
        parts = [f"epoch {epoch + 1}/{self.total_epochs}", *summary(metrics), f"samples/s={self._throughput():.1f}",
                 f"data_wait={100 * waiting:.0f}%"]
        self._write_line(" ".join(parts), file=sys.stdout)
        sys.stdout.flush()
        for rank, step_s, median_s in self.stragglers.update(list(rank_step_s)):
            self._write_line(f"autocnnp: rank {rank} is a straggler: its own work per step (compute and data wait, "
                             f"not the time blocked in collectives) took {step_s / median_s:.1f} x the ranks' "
                             f"median ({1000 * step_s:.0f} ms against {1000 * median_s:.0f} ms) for "
                             f"{self.stragglers.epochs} epochs in a row", file=sys.stderr)
            for tracker in self.trackers:
                tracker.straggler(epoch, rank, step_s, median_s)
        self._reset_epoch_counters()

    def _append_metrics(self, epoch: int, metrics: dict[str, float]) -> None:
        row = {"epoch": epoch + 1, **{name: repr(value) for name, value in metrics.items()}}
        if self._columns is None or not set(metrics) <= set(self._columns):
            # new metric names: rewrite the file with the union of columns
            old = set(self._columns or ["epoch"]) - {"epoch"}
            rows = _read_csv(self.metrics_path)[1] if self.metrics_path.exists() else []
            self._columns = ["epoch", *sorted(old | set(metrics))]
            _write_csv(self.metrics_path, self._columns, [*rows, row])
            return
        append_text(self.metrics_path, _csv_line(row.get(name, "") for name in self._columns))

    def close(self, status: str = "completed") -> None:
        """Stop sampling and the bar, and close the trackers with the run's ``status`` (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._sampler.stop()
        if self.rank != 0:
            return
        self._bar.close()
        for tracker in self.trackers:
            tracker.close(status)

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(outcome(exc))


def outcome(exc: BaseException | None) -> str:
    """A run's status from the exception that ended it (None: it completed)."""
    if exc is None:
        return "completed"
    return ("diverged" if isinstance(exc, Diverged) else "stopped" if isinstance(exc, StopRequested) else
            "terminated" if isinstance(exc, (SystemExit, KeyboardInterrupt)) else "failed")


def summary(metrics: dict[str, float]) -> list[str]:
    """``name=value`` words for the console: losses first, then the rest by name; per-class values
    (``dice/edema``, ``dice/core`` ...) as one word per family: ``dice[edema,core]=0.91,0.80``."""
    families: dict[str, list[str]] = {}
    for name in metrics:
        if "/" in name:
            families.setdefault(name.split("/", 1)[0], []).append(name)
    words = [f"{name}={metrics[name]:.4g}" for name in sorted(metrics, key=lambda n: (not n.endswith("loss"), n))
             if "/" not in name]
    for family, names in families.items():
        words.append(f"{family}[{','.join(n.split('/', 1)[1] for n in names)}]="
                     + ",".join(f"{metrics[n]:.3g}" for n in names))
    return words


def _csv_line(values) -> str:
    line = io.StringIO(newline="")
    csv.writer(line).writerow(values)
    return line.getvalue()


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, text.getvalue())


def _column(rows: list[dict[str, str]], name: str) -> list[float]:
    return [float(row[name]) if row.get(name) else math.nan for row in rows]


def plot_run(rundir: RunDir) -> list[Path]:
    """(Re)make ``plots/*.png`` from metrics.csv and resources/*.csv; returns the files written.

    learning_curves.png: every ``*loss`` column; metrics.png: the SegEval metrics and the mean
    foreground Dice; classes.png: the Dice of every class and region (``dice/NAME``,
    ``region_dice/NAME``); resources.png: :func:`plot_resources`.
    """
    from matplotlib.figure import Figure  # Agg canvas, no pyplot global state

    plots = rundir.plots
    written: list[Path] = []

    def save(fig: Figure, name: str) -> None:
        _save_png(fig, plots / name)
        written.append(plots / name)

    metrics_path = rundir.metrics
    if metrics_path.exists():
        columns, rows = _read_csv(metrics_path)
        epochs = [int(row["epoch"]) for row in rows]
        groups = {
            "learning_curves.png": ("loss", [c for c in columns if c.endswith("loss")]),
            "metrics.png": ("metric", [c for c in columns if c in (*SEGEVAL, FOREGROUND_DICE)]),
            "classes.png": ("Dice", [c for c in columns if c.startswith(("dice/", "region_dice/"))]),
        }
        for filename, (ylabel, names) in groups.items():
            if not rows or not names:
                continue
            fig = Figure(figsize=(7, 4.5))
            ax = fig.add_subplot()
            for name in names:
                ax.plot(epochs, _column(rows, name), marker="o", markersize=3, label=name)
            ax.set(xlabel="epoch", ylabel=ylabel)
            ax.grid(alpha=0.3)
            ax.legend()
            save(fig, filename)

    resources = plot_resources(rundir, plots / "resources.png")
    return written + ([resources] if resources else [])


def plot_resources(rundir: RunDir, path: Path) -> Path | None:
    """Every rank's step time, time waiting for data and in collectives, CPU and RSS (and GPU) over time into
    ``path``: a panel each, every rank in each panel, so that a rank out of step stands out; None before the first
    sample."""
    from matplotlib.figure import Figure

    tables = {}
    for samples in rundir.all_resource_samples():
        rows = _read_csv(samples)[1]
        if rows:
            tables[int(rows[0]["rank"])] = rows
    if not tables:
        return None
    t0 = min(float(rows[0]["time_s"]) for rows in tables.values())
    panels = [("step_ms", "step ms"), ("data_wait_ms", "data wait ms"), ("collective_wait_ms", "collectives ms"),
              ("cpu_percent", "CPU %"), ("rss_mb", "RSS MB")]
    panels += [
        (name, label)
        for name, label in (("gpu_util_percent", "GPU util %"), ("gpu_mem_mb", "GPU mem MB"))
        if any(row[name] for rows in tables.values() for row in rows)
    ]
    fig = Figure(figsize=(7, 2.2 * len(panels)))
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for rank, rows in sorted(tables.items()):
        times = [float(row["time_s"]) - t0 for row in rows]
        for ax, (name, label) in zip(axes, panels):
            ax.plot(times, _column(rows, name), marker=".", markersize=3, label=f"rank {rank}")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small", ncol=min(4, len(tables)))
    axes[-1].set_xlabel("time [s]")
    _save_png(fig, path)
    return path


def _save_png(fig, path: Path) -> None:
    """``fig`` laid out into the PNG ``path``, written atomically (a full disk leaves no half plot)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
