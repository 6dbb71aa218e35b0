"""Tests for run monitoring: divergence guard, resource sampler, Monitor outputs and plots."""

import csv
import json
import math
import time

import pytest

from autocnnp.components.trackers.files import Config as FilesConfig
from autocnnp.components.trackers.files import Files
from autocnnp.core.rundir import RunDir
from autocnnp.generator.protocols import RunInfo, Tracker, collective_wait
from autocnnp.training.monitor import (
    RESOURCE_COLUMNS,
    Diverged,
    DivergenceGuard,
    Monitor,
    MonitoringConfig,
    ResourceSampler,
    StragglerWatch,
    plot_run,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STEPS = 4


def config(**overrides):
    return MonitoringConfig(
        progress=False, sample_interval_s=0.05, log_every_steps=2, **overrides
    )


def files(path, first_step: int = 0, **overrides) -> list:
    """The files tracker (TensorBoard, plots) of a run in ``path``."""
    info = RunInfo("job", path, {}, {}, {}, first_step=first_step)
    return [Files(FilesConfig(**overrides), info=info)]


def epoch_metrics(epoch):
    return {
        "train_loss": 1.0 / (epoch + 1),
        "valid_loss": 1.2 / (epoch + 1),
        "dice": 0.5 + 0.1 * epoch,
        "mean_iou": 0.4 + 0.1 * epoch,
    }


def run_epochs(monitor, epochs):
    for epoch in epochs:
        for step in range(STEPS):
            monitor.step(epoch, step, loss=1.0 / (epoch * STEPS + step + 1), samples=2)
        monitor.epoch_end(epoch, epoch_metrics(epoch))


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def is_png(path):
    data = path.read_bytes()
    return data.startswith(PNG_SIGNATURE) and len(data) > 5000


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished 3-epoch rank-0 run with world size 2."""
    out = tmp_path_factory.mktemp("run")
    with Monitor(RunDir(out), 0, 2, config(), total_epochs=3, steps_per_epoch=STEPS, start_epoch=0,
                 trackers=files(out)) as monitor:
        run_epochs(monitor, range(3))
    monitor.close()  # second close is a no-op
    return out


# ---------------------------------------------------------------- divergence


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_loss_diverges(bad):
    guard = DivergenceGuard(1e3)
    guard.check(0.7, epoch=0, step=0)
    with pytest.raises(Diverged) as info:
        guard.check(bad, epoch=2, step=4)
    message = str(info.value)
    assert "epoch 3" in message and "step 5" in message
    assert "learning rate" in message and "warmup" in message and "stop_on_divergence" in message
    assert info.value.epoch == 2 and info.value.step == 4


def test_nan_as_first_loss_diverges():
    with pytest.raises(Diverged, match="not finite"):
        DivergenceGuard(1e3).check(math.nan, 0, 0)


def test_exploding_loss_diverges():
    guard = DivergenceGuard(100.0)
    guard.check(0.5, 0, 0)
    guard.check(49.0, 0, 1)  # below 100 x 0.5
    with pytest.raises(Diverged, match="exceeds 100 x the initial loss 0.5"):
        guard.check(51.0, 1, 3)


def test_decreasing_loss_and_disabled_guard_never_raise():
    guard = DivergenceGuard(10.0)
    for step, loss in enumerate([2.0, 1.5, 1.0, 0.2, 1e-4]):
        guard.check(loss, 0, step)
    disabled = DivergenceGuard(10.0, enabled=False)
    for step, loss in enumerate([1.0, 1e9, math.nan, math.inf]):
        disabled.check(loss, 0, step)


# ---------------------------------------------------------------- resources


def test_resource_sampler_rows(tmp_path):
    path = tmp_path / "res" / "rank3.csv"
    with ResourceSampler(path, rank=3, interval_s=10.0) as sampler:
        pass
    sampler.stop()  # idempotent
    rows = read_rows(path)
    assert len(rows) >= 2
    assert tuple(rows[0]) == RESOURCE_COLUMNS
    assert all(row["rank"] == "3" and float(row["rss_mb"]) > 0 for row in rows)
    assert float(rows[-1]["time_s"]) >= float(rows[0]["time_s"])
    assert rows[0]["cpu_percent"] == ""  # the first row comes right after psutil's priming call: no share yet


# ---------------------------------------------------------------- Monitor


def test_metrics_csv_after_three_epochs(run_dir):
    rows = read_rows(run_dir / "metrics.csv")
    assert list(rows[0]) == ["epoch", "dice", "mean_iou", "train_loss", "valid_loss"]
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]  # numbered as the console numbers them
    for row in rows:
        expected = epoch_metrics(int(row["epoch"]) - 1)
        for name, value in expected.items():
            assert float(row[name]) == pytest.approx(value)


def test_epoch_summary_printed(tmp_path, capsys):
    with Monitor(RunDir(tmp_path), 0, 2, config(), 3, STEPS, 0) as monitor:
        run_epochs(monitor, [0])
    line = capsys.readouterr().out.strip()
    assert line.startswith("epoch 1/3 train_loss=1 valid_loss=1.2 dice=0.5")
    assert "samples/s=" in line


def test_per_class_values_print_as_one_word_per_family(tmp_path, capsys):
    with Monitor(RunDir(tmp_path), 0, 1, config(), 1, STEPS, 0) as monitor:
        monitor.epoch_end(0, {"train_loss": 0.5, "dice": 0.75, "dice/background": 0.99, "dice/edema": 0.5,
                              "iou/edema": 0.33, "region_dice/whole_tumour": 0.61})
    line = capsys.readouterr().out.strip()
    assert "train_loss=0.5 dice=0.75 dice[background,edema]=0.99,0.5 iou[edema]=0.33 region_dice[whole_tumour]=0.61" \
        in line
    assert read_rows(tmp_path / "metrics.csv")[0]["dice/edema"] == "0.5"


def test_resume_drops_later_epochs(tmp_path):
    cfg = config()
    with Monitor(RunDir(tmp_path), 0, 1, cfg, 3, STEPS, 0) as monitor:
        run_epochs(monitor, range(3))
    with Monitor(RunDir(tmp_path), 0, 1, cfg, 3, STEPS, start_epoch=1) as monitor:
        assert [r["epoch"] for r in read_rows(tmp_path / "metrics.csv")] == ["1"]
        run_epochs(monitor, [1])
    assert [r["epoch"] for r in read_rows(tmp_path / "metrics.csv")] == ["1", "2"]


def test_new_metric_names_extend_the_header(tmp_path):
    cfg = config()
    with Monitor(RunDir(tmp_path), 0, 1, cfg, 2, STEPS, 0) as monitor:
        monitor.epoch_end(0, {"train_loss": 1.0})
        monitor.epoch_end(1, {"train_loss": 0.5, "dice": 0.7})
    rows = read_rows(tmp_path / "metrics.csv")
    assert list(rows[0]) == ["epoch", "dice", "train_loss"]
    assert rows[0]["dice"] == "" and rows[1]["dice"] == "0.7"


def test_tensorboard_scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss_step", "metrics/dice", "metrics/train_loss"} <= set(tags)
    dice = acc.Scalars("metrics/dice")
    assert [e.value for e in dice] == pytest.approx([0.5, 0.6, 0.7])
    assert [e.step for e in dice] == [STEPS, 2 * STEPS, 3 * STEPS]
    loss_steps = [e.step for e in acc.Scalars("train/loss_step")]
    assert loss_steps == list(range(2, 3 * STEPS + 1, 2))  # every log_every_steps=2


def test_resumed_tensorboard_has_no_duplicates(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = config()
    with Monitor(RunDir(tmp_path), 0, 1, cfg, 2, STEPS, 0, trackers=files(tmp_path, plots=False)) as monitor:
        run_epochs(monitor, range(2))
    with Monitor(RunDir(tmp_path), 0, 1, cfg, 2, STEPS, start_epoch=1,
                 trackers=files(tmp_path, first_step=STEPS, plots=False)) as monitor:
        run_epochs(monitor, [1])
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("metrics/dice")] == [STEPS, 2 * STEPS]
    assert [e.step for e in acc.Scalars("train/loss_step")] == [2, 4, 6, 8]


def test_plots_are_png(run_dir):
    for name in ("learning_curves.png", "metrics.png", "resources.png"):
        assert is_png(run_dir / "plots" / name), name
    written = plot_run(RunDir(run_dir))  # re-making from the CSVs works too
    assert sorted(p.name for p in written) == [
        "learning_curves.png",
        "metrics.png",
        "resources.png",
    ]
    rows = read_rows(run_dir / "resources" / "rank0.csv")
    assert len(rows) >= 2 and all(float(r["rss_mb"]) > 0 for r in rows)


def test_non_zero_rank_writes_only_resources(tmp_path):
    with Monitor(RunDir(tmp_path), 1, 2, config(), total_epochs=1, steps_per_epoch=STEPS, start_epoch=0) as monitor:
        run_epochs(monitor, [0])
    assert not (tmp_path / "metrics.csv").exists()
    assert not (tmp_path / "plots").exists()
    assert not (tmp_path / "tensorboard").exists()
    rows = read_rows(tmp_path / "resources" / "rank1.csv")
    assert len(rows) >= 2 and all(r["rank"] == "1" for r in rows)


def test_own_work_leaves_out_the_time_blocked_in_collectives(tmp_path):
    """A step's time in the strategy's collectives (waiting for the other ranks) is not the rank's own work;
    the resource samples record it per step."""
    with Monitor(RunDir(tmp_path), 1, 2, config(), 1, STEPS, 0) as monitor:
        for step in range(STEPS):
            with collective_wait.blocking():  # as if the step had waited for the other rank
                time.sleep(0.05)
            monitor.step(0, step, 1.0, 2, step_s=0.5, data_wait_s=0.05)
        assert 0.4 < monitor.mean_step_s() <= 0.45
    rows = [row for row in read_rows(tmp_path / "resources" / "rank1.csv") if row["collective_wait_ms"]]
    assert rows and all(50 <= float(row["collective_wait_ms"]) < 100 for row in rows)


def test_a_rank_whose_steps_stay_slow_is_flagged_once(tmp_path, capsys):
    from autocnnp.run.manifest import Stragglers

    watch = StragglerWatch()
    assert watch.update([0.1, 0.1, 0.4, 0.1]) == []  # one slow epoch: not yet
    assert watch.update([0.1, 0.1, 0.4, 0.1]) == [(2, 0.4, 0.1)]  # stays slow: flagged
    assert watch.update([0.1, 0.1, 0.4, 0.1]) == [] and watch.update([0.1, 0.12, 0.14, 0.1]) == []  # once; 1.4x: no
    assert StragglerWatch().update([0.2]) == []
    info = RunInfo("job", tmp_path, {}, {}, {})
    seen = []

    class Seen(Tracker):
        def straggler(self, *args):
            seen.append(args)

    with Monitor(RunDir(tmp_path), 0, 2, config(), 3, STEPS, 0, trackers=[Seen(info=info), Stragglers(info=info)]) as monitor:
        for epoch in range(3):
            monitor.epoch_end(epoch, epoch_metrics(epoch), [0.1, 0.3])
    err = capsys.readouterr().err
    assert err.count("straggler") == 1 and ("rank 1 is a straggler: its own work per step (compute and data wait, not "
                                            "the time blocked in collectives) took 3.0 x the ranks' median") in err
    assert seen == [(1, 1, 0.3, 0.1)]
    manifest = json.loads(RunDir(tmp_path).manifest.read_text())
    assert manifest["stragglers"] == [{"rank": 1, "epoch": 2, "own_work_ms": 300.0, "median_ms": 100.0}]
