"""`autocnnp tune`: the GreScale guideline flowchart (thesis Figure 6.3) driven by scripted runners, the
CLI's state/resume/report, `autocnnp lr-plot`, and two small real tunes over mpirun."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from jobfiles import QUIET, TINY_UNET, synthetic_data, write_job

from autocnnp.tuning import guideline as gl
from autocnnp.tuning.guideline import ACTIONS, Guideline, Settings, Steps, compare, default_settings

DEFAULTS = default_settings(120)  # thesis defaults for a 120-epoch run
BASE_AT = {"dice": 0.8132, "pixel_accuracy": 0.9986, "mean_accuracy": 0.9611, "mean_iou": 0.8910, "fw_iou": 0.9976}


def m(dice, ma=0.95, iou=0.88):
    return {"dice": dice, "pixel_accuracy": 0.998, "mean_accuracy": ma, "mean_iou": iou, "fw_iou": 0.997}


class Scripted:
    """A fake runner: answers each run from a script keyed by run name; records the variants."""

    def __init__(self, script: dict[str, dict]):
        self.script, self.calls = script, []

    def __call__(self, variant: gl.Variant) -> dict:
        self.calls.append(variant)
        return self.script[variant.name]


def walk(script, world_size=14, **kw) -> tuple[gl.Outcome, Scripted]:
    runner = Scripted(script)
    kw = {"total_epochs": 120, "initial": DEFAULTS, "seed": 7, **kw}
    return Guideline(runner, world_size=world_size, **kw).walk(), runner


def test_defaults_follow_the_thesis():
    assert DEFAULTS == Settings(lr=1e-5, optimizer="sgd", warmup_epochs=5, decay_coefficient=0.9, decay_epochs=49)
    assert [label for _, label, _ in ACTIONS] == [
        "Decrease the initial Lr value", "Increase the Lr decay coefficient", "Increase the warmup period",
        "Increase the decay phase period", "Change the optimizer"]
    assert DEFAULTS.overrides() == {"lr_policy": "grescale", "hyperparameters.lr": "1e-05",
                                    "hyperparameters.optimizer": "sgd", "lr_policy.warmup_epochs": "5",
                                    "lr_policy.decay_coefficient": "0.9", "lr_policy.decay_epochs": "49"}


def test_compare_is_dice_then_mean_accuracy_then_mean_iou():
    assert compare(m(0.80), m(0.79), 0.0) == 1
    assert compare(m(0.80, ma=0.5), m(0.79, ma=0.99), 0.0) == 1  # Dice decides first
    assert compare(m(0.80, ma=0.96), m(0.8004, ma=0.95), tolerance=0.001) == 1  # Dice tie -> MA
    assert compare(m(0.80, ma=0.95, iou=0.8), m(0.80, ma=0.95, iou=0.9), 0.0) == -1  # then mean IoU
    assert compare(m(0.8), m(0.8), 0.0) == 0
    assert compare({"dice": float("nan")}, m(0.1), 0.0) == -1


def test_below_the_threshold_just_trains():
    outcome, runner = walk({"iter-0": m(0.7)}, world_size=8)
    assert outcome.branch == "train" and outcome.finished and outcome.runs == 1
    assert [(r.iteration, r.action) for r in outcome.rows] == [(0, "Apply default parameters")]
    assert outcome.baseline is None
    assert runner.calls[0].world_size == 8 and runner.calls[0].overrides["lr_policy"] == "grescale"


def test_table_6_3_left_atrium_14_gpus():
    """Thesis Table 6.3: three lr decreases (the third is worse), then the decay coefficient reaches
    the baseline, then a validation run."""
    script = {"baseline": BASE_AT, "iter-0": m(0.79), "iter-1": m(0.8075), "iter-2": m(0.8093),
              "iter-3": m(0.7714), "iter-4": m(0.8141, 0.9647, 0.8945), "iter-5": m(0.8155, 0.9722, 0.8954)}
    outcome, runner = walk(script)
    assert [r.action for r in outcome.rows] == [
        "Apply default parameters", "Decrease the initial Lr value", "Decrease the initial Lr value",
        "Decrease the initial Lr value", "Increase the Lr decay coefficient", "Model validation"]
    assert outcome.finished and "confirmed" in outcome.status and outcome.runs == 7
    lrs = [float(c.overrides["hyperparameters.lr"]) for c in runner.calls[1:]]
    assert lrs == pytest.approx([1e-5, 5e-6, 2.5e-6, 1.25e-6, 1.25e-6, 1.25e-6])  # steps are cumulative
    assert runner.calls[0].world_size == 1 and runner.calls[0].overrides == {"parallelism-degree": "1",
                                                                          "parallelism-degree.virtual": "1"}
    assert runner.calls[5].overrides["lr_policy.decay_coefficient"] == "0.95"
    assert runner.calls[6].overrides["seed"] == "8" and "seed" not in runner.calls[5].overrides
    assert [r.reached for r in outcome.rows][-2:] == [True, True]


def test_table_6_6_brain_tumour_16_gpus_walks_through_four_actions():
    """Thesis Table 6.6: an action is repeated while the model improves on the previous iteration."""
    base = {"dice": 0.8901, "pixel_accuracy": 0.997, "mean_accuracy": 0.9447, "mean_iou": 0.92, "fw_iou": 0.9942}
    dice = [0.85, 0.8714, 0.6933, 0.8625, 0.6956, 0.8843, 0.8841, 0.8943, 0.8921]
    script = {"baseline": base, **{f"iter-{i}": m(d) for i, d in enumerate(dice)}}
    outcome, runner = walk(script)
    assert [r.action for r in outcome.rows[1:]] == [
        "Decrease the initial Lr value", "Decrease the initial Lr value", "Increase the Lr decay coefficient",
        "Increase the Lr decay coefficient", "Increase the warmup period", "Increase the warmup period",
        "Increase the decay phase period", "Model validation"]
    last = runner.calls[-1].overrides
    assert (last["lr_policy.warmup_epochs"], last["lr_policy.decay_epochs"]) == ("7", "50")
    assert last["lr_policy.decay_coefficient"] == "1" and float(last["hyperparameters.lr"]) == pytest.approx(2.5e-6)


def test_revert_worse_starts_the_next_action_from_the_last_improvement():
    script = {"baseline": BASE_AT, "iter-0": m(0.79), "iter-1": m(0.80), "iter-2": m(0.70), "iter-3": m(0.82),
              "iter-4": m(0.82)}
    outcome, runner = walk(script, revert_worse=True)
    assert float(runner.calls[4].overrides["hyperparameters.lr"]) == pytest.approx(5e-6)  # iter-2's 2.5e-6 undone


def test_every_action_exhausted_without_reaching_the_baseline():
    calls = iter(range(100))
    runner = lambda v: m(0.5 - 0.01 * next(calls))  # noqa: E731 - always worse than the iteration before
    outcome = Guideline(runner, world_size=16, total_epochs=10, initial=default_settings(10), budget=50).walk()
    assert outcome.finished and "not reached" in outcome.status
    actions = [r.action for r in outcome.rows[1:]]
    assert actions == [label for _, label, _ in ACTIONS]  # each tried once (never improved)
    assert outcome.rows[-1].settings.optimizer == "adam"
    assert outcome.best.iteration == 0


def test_limits_stop_an_action_without_a_run():
    s = Settings(lr=1.5e-6, optimizer="sgd", warmup_epochs=5, decay_coefficient=0.9, decay_epochs=5)
    assert gl.decrease_lr(s, Steps(), 10) is None  # 7.5e-7 would go below the thesis' 1e-6
    assert gl.increase_warmup(s, Steps(), 10) is None and gl.increase_decay_period(s, Steps(), 10) is None
    assert gl.change_optimizer(replace(s, optimizer="adam"), Steps(), 10, {"sgd"}) is None


def test_budget_then_resume_replays_without_retraining():
    script = {"baseline": BASE_AT, "iter-0": m(0.79), "iter-1": m(0.8075), "iter-2": m(0.8093),
              "iter-3": m(0.7714), "iter-4": m(0.8141, 0.9647, 0.8945), "iter-5": m(0.8155, 0.9722)}
    cache: dict = {}
    first, runner1 = walk(script, budget=3, cache=cache)
    assert not first.finished and "budget" in first.status and first.runs == 3
    assert [c.name for c in runner1.calls] == ["baseline", "iter-0", "iter-1"]
    again, runner2 = walk(script, cache=json.loads(json.dumps(cache)))  # as saved in state.json
    assert [c.name for c in runner2.calls] == ["iter-2", "iter-3", "iter-4", "iter-5"]
    assert again.finished and [r.metrics for r in again.rows] == [r.metrics for r in walk(script)[0].rows]
    changed, runner3 = walk(script, cache=json.loads(json.dumps(cache)), steps=Steps(lr_factor=0.8))
    assert [c.name for c in runner3.calls][0] == "iter-1"  # another step: that run no longer matches


# --- the command line (runs replaced by a scripted runner) -------------------------------------------------


def tiny_job(tmp_path: Path, degree: int = 2, epochs: int = 2, kind: str = "atrium") -> Path:
    return write_job(tmp_path / "job.xml", degree=degree, output="out", arch=TINY_UNET,
                     data=synthetic_data(16, 6, kind),
                     hyper={"minibatch_size": 2, "end_epoch": epochs, "lr": 0.05, "optimiser": "sgd"}, extra=QUIET)


def test_cli_writes_table_plot_state_and_resumes(tmp_path, cli, monkeypatch):
    job = tiny_job(tmp_path, degree=14, epochs=20)
    script = {"baseline": BASE_AT, "iter-0": m(0.79), "iter-1": m(0.8075), "iter-2": m(0.8093),
              "iter-3": m(0.7714), "iter-4": m(0.8141, 0.9647, 0.8945), "iter-5": m(0.8155, 0.9722)}
    calls = []

    def fake(self, variant):
        calls.append((variant.name, self.folder(variant)))
        if variant.name == "iter-3" and len(calls) == 5:
            raise KeyboardInterrupt  # interrupted in the middle of a run
        return script[variant.name]

    monkeypatch.setattr("autocnnp.tuning.runner.JobRunner.__call__", fake)
    with pytest.raises(KeyboardInterrupt):
        cli("tune", job)
    tune = tmp_path / "out" / "tune"
    state = json.loads((tune / "state.json").read_text())
    assert sorted(state["cache"]) == ["baseline", "iter-0", "iter-1", "iter-2"]
    rc, out, err = cli("tune", job)
    assert rc == 0, err
    assert [c[0] for c in calls] == ["baseline", "iter-0", "iter-1", "iter-2", "iter-3", "iter-3", "iter-4", "iter-5"]
    assert calls[4][1] == calls[5][1]  # the interrupted run resumes in its own folder
    rows = list(csv.DictReader(open(tune / "tune.csv")))
    assert [r["iteration"] for r in rows] == ["0", "1", "2", "3", "4", "5", "baseline"]
    assert rows[4]["action"] == "Increase the Lr decay coefficient" and rows[4]["reached_baseline"] == "True"
    assert rows[-1]["action"] == "Baseline model performances" and rows[-1]["ranks"] == "1"
    assert "Model validation" in out and "81.41%" in out and "Baseline model performances" in out
    assert (tune / "tune.png").stat().st_size > 5000
    assert json.loads((tune / "state.json").read_text())["finished"] is True
    # the job changed: refuse to mix runs of two jobs
    job.write_text(job.read_text().replace("<seed>0</seed>", "<seed>1</seed>"))
    rc, _, err = cli("tune", job)
    assert rc == 2 and "--restart" in err


def test_cli_baseline_from_a_finished_run_and_bad_options(tmp_path, cli, monkeypatch):
    job = tiny_job(tmp_path, degree=14, epochs=20)
    base = tmp_path / "base"
    base.mkdir()
    (base / "metrics.csv").write_text("epoch,dice,mean_accuracy,mean_iou,pixel_accuracy,fw_iou\n"
                                      "19,0.5,0.5,0.5,0.9,0.9\n")
    seen = []
    monkeypatch.setattr("autocnnp.tuning.runner.JobRunner.__call__",
                        lambda self, v: seen.append(v.name) or m(0.6))
    rc, out, err = cli("tune", job, "--baseline", base, "--out", tmp_path / "t")
    assert rc == 0, err
    assert seen == ["iter-0", "iter-1"]  # reached at once, then validated; no baseline run
    assert cli("tune", job, "--budget", "0")[0] == 2
    assert cli("tune", job, "--lr-factor", "1.5", "--out", tmp_path / "t2")[0] == 2
    assert cli("tune", job, "--baseline", tmp_path)[0] == 2


def test_lr_plot_command(tmp_path, cli):
    job = tiny_job(tmp_path, degree=4, epochs=40)
    out = tmp_path / "lr.png"
    rc, text, err = cli("lr-plot", job, "--out", out, "--policy", "grescale", "--policy", "warmup_step_decay",
                        "--policy", "constant", "--policy", "linear_scaling", "--policy", "job")
    assert rc == 0, err
    assert out.stat().st_size > 5000
    assert "GreScale" in text and "x0.1 at epoch(s) 30, 60, 80" in text and "x 4 replicas" in text
    rc, text, _ = cli("plot-lr", job, "--out", tmp_path / "g.png", "--set", "lr_policy=grescale", "--ranks", "16")
    assert rc == 0 and "x 16 replicas" in text and "grescale" in text
    assert cli("lr-plot", job, "--policy", "nope", "--out", out)[0] == 2


# --- real runs ---------------------------------------------------------------------------------------------

def autocnnp(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "autocnnp", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.ranks
def test_real_tune_below_the_threshold_trains_once(tmp_path):
    job = tiny_job(tmp_path)
    result = autocnnp("tune", job)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Apply default parameters" in result.stdout and "no tuning needed" in result.stdout
    rows = list(csv.DictReader(open(tmp_path / "out" / "tune" / "tune.csv")))
    assert len(rows) == 1 and 0 <= float(rows[0]["dice"]) <= 1 and rows[0]["lr"] == "1e-05"
    run = next((tmp_path / "out" / "tune" / "runs").iterdir())
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert manifest["job"]["overrides"]["lr_policy"] == "grescale"
    policy = next(a for a in manifest["plan"]["actions"] if a["type"] == "lr_policy")
    assert policy["implementation"] == "grescale" and policy["parameters"]["warmup_epochs"] == 5
    assert manifest["plan"]["hyperparameters"]["lr"] == 1e-5


@pytest.mark.ranks
def test_real_tune_above_a_lowered_threshold_with_a_budget(tmp_path):
    # 4-class blobs: the 1-rank baseline (SGD, lr 0.05) learns the background class in 2 epochs, while
    # GreScale's lr 1e-5 leaves the model near its random start: the walk has to begin
    job = tiny_job(tmp_path, kind="brain")
    result = autocnnp("tune", job, "--ranks-threshold", "2", "--budget", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "budget of 3 exhausted" in result.stdout
    tune = tmp_path / "out" / "tune"
    rows = list(csv.DictReader(open(tune / "tune.csv")))
    assert [(r["iteration"], r["ranks"]) for r in rows] == [("0", "2"), ("1", "2"), ("baseline", "1")]
    assert rows[1]["action"] == "Decrease the initial Lr value" and rows[1]["lr"] == "5e-06"
    state = json.loads((tune / "state.json").read_text())
    assert state["runs"] == 3 and state["finished"] is False and state["branch"] == "tune"
    runs = sorted(p.name.split("-")[0] for p in (tune / "runs").iterdir())
    assert runs == ["baseline", "iter", "iter"]
    assert (tune / "tune.png").exists()


def test_lr_plot_counts_the_steps_training_takes_with_each_strategy():
    """lr-plot's steps per epoch are the trainer's: the shard of each training rank (a dedicated parameter
    server reads no data, so 3 ranks split the data in 2), padded, in whole minibatches."""
    from autocnnp.generator.assemble import assemble
    from autocnnp.generator.overrides import read_variant
    from autocnnp.tuning.lr_plot import steps_per_epoch

    demo = Path(__file__).resolve().parents[1] / "xml_configs" / "demo.xml"
    sets = {"parallelism-degree": "3", "hyperparameters.minibatch_size": "4", "data.train_samples": "128"}
    ring = assemble(read_variant(demo, sets))
    server = assemble(read_variant(demo, {**sets, "dist_strategy": "parameter_server",
                                          "dist_strategy.server": "dedicated"}))
    assert steps_per_epoch(ring, 3) == 43 // 4 == 10  # ceil(128 / 3) = 43 samples per rank
    assert steps_per_epoch(server, 3) == 64 // 4 == 16  # 2 workers hold the data
    assert steps_per_epoch(server, 5) == 32 // 4 == 8
