"""Reproducibility (thesis chapter 5): job variants (--set), manifest.json, deterministic mode, --repeat."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from jobfiles import QUIET, TINY_UNET, synthetic_data, write_job

from autocnnp.core.errors import JobError
from autocnnp.engine.job import read_job
from autocnnp.generator.assemble import assemble
from autocnnp.generator.overrides import apply_overrides, parse_sets, read_variant
from autocnnp.run import manifest as mf
from autocnnp.run.job import load_job
from autocnnp.run.launch import build_command

# --- job variants -------------------------------------------------------------------------------------------

def test_overrides_change_the_assembled_job(job, tmp_path):
    path = job()
    job_ = load_job(read_variant(path, {"seed": "5", "output": str(tmp_path / "o"), "parallelism-degree": "3",
                                        "hyperparameters.lr": "1e-4", "hyperparameters.deterministic": "true",
                                        "monitoring.tensorboard": "false", "data.size": "16",
                                        "architecture.depth": "2", "lr_policy": "grescale",
                                        "lr_policy.decay_coefficient": "1.2"}))
    gen = job_.generator
    assert (gen.seed, gen.rundir.root, gen.world_size) == (5, tmp_path / "o", 3)
    assert gen.hyperparameters.lr == 1e-4 and gen.hyperparameters.deterministic is True
    assert gen.hyperparameters.minibatch_size == 4  # untouched settings stay
    assert dict((entry.name, config) for entry, config in job_.trackers)["files"].tensorboard is False
    assert gen.action("dataset_injection").config.size == 16
    assert gen.action("architecture_injection").config.depth == 2
    policy = gen.action("lr_policy")
    # another implementation: gradual_warmup's warmup_epochs=1 is dropped, grescale's defaults apply
    assert policy.entry.name == "grescale" and policy.config.warmup_epochs == 5
    assert policy.config.decay_coefficient == 1.2
    # the workers get the variant on their command line
    cmd, _ = build_command(job_)
    assert "--set=lr_policy=grescale" in cmd and "--set=seed=5" in cmd


def test_override_an_action_the_job_leaves_out_and_bad_overrides(job):
    path = job(('<action class="extensible" type="checkpoint">\n          <value>periodic</value>\n'
                '          <value name="every_epochs">1</value>\n        </action>', ""))
    gen = assemble(read_variant(path, {"checkpoint.keep": "5"}))
    assert gen.action("checkpoint").config.keep == 5
    with pytest.raises(JobError, match=r"--set hyperparameters.lr=abc: .*lr"):
        assemble(read_variant(path, {"hyperparameters.lr": "abc"}))
    with pytest.raises(JobError, match="cannot override 'nonsense'"):
        apply_overrides(read_job(path), {"nonsense": "1"})
    with pytest.raises(JobError, match="KEY=VALUE"):
        parse_sets(["lr"])
    assert parse_sets(["a=1", "b.c = x=y"]) == {"a": "1", "b.c": "x=y"}


def test_cli_set_on_validate_and_plan(job, cli):
    path = job()
    rc, out, err = cli("plan", path, "--set", "lr_policy=grescale", "--set", "parallelism-degree=4")
    assert rc == 0, err
    assert "lr_policy [extensible] = grescale" in out and "parallelism-degree: 4" in out
    assert "--set=lr_policy=grescale" in out
    rc, _, err = cli("validate", path, "--set", "hyperparameters.end_epoch=0")
    assert rc == 2 and "--set hyperparameters.end_epoch=0" in err


# --- manifest pieces ------------------------------------------------------------------------------------------

def test_dataset_checksum_content_and_stat(tmp_path):
    data = tmp_path / "Task02"
    (data / "imagesTr").mkdir(parents=True)
    (data / "dataset.json").write_text("{}")
    img = data / "imagesTr" / "a.nii.gz"
    img.write_bytes(b"0123456789")
    content, stat = mf.dataset_checksum([data], "content"), mf.dataset_checksum([data], "stat")
    assert content["files"] == 2 and content["bytes"] == 12 and content["method"] == "content"
    assert mf.dataset_checksum([data], "auto")["method"] == "content"  # small: contents are hashed
    before = img.stat()
    img.write_bytes(b"0123456780")  # same size, same mtime, other content
    os.utime(img, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert mf.dataset_checksum([data], "stat")["sha256"] == stat["sha256"]
    assert mf.dataset_checksum([data], "content")["sha256"] != content["sha256"]
    assert "not the contents" in stat["description"]


def test_lr_policy_and_divergence_reference_are_saved_and_resumed():
    from autocnnp.components.lr_policies import grescale
    from autocnnp.training.loop import TrainState
    from autocnnp.training.monitor import DivergenceGuard
    from autocnnp.training.run import Run, restore

    numbers = dict(base_lr=0.1, replicas=2, steps_per_epoch=2, total_epochs=12)
    policy = grescale.GreScale(grescale.Config(), **numbers)
    policy.on_epoch_end(0, {"valid_loss": 1.0})
    policy.on_epoch_end(1, {"valid_loss": 2.0})  # warmup extended
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    class Checkpoints:
        def plugin_state(self):
            return {}

        def load_plugin_state(self, state):
            pass

        def latest(self):
            return "ckpt"

    run = SimpleNamespace(state=TrainState(opt, epoch=2), checkpoints=Checkpoints(), policy=policy,
                          world=SimpleNamespace(world_size=2),
                          gen=SimpleNamespace(seed=0, spec=SimpleNamespace(file="j"), virtual_ranks=1),
                          data=SimpleNamespace(in_channels=2, num_classes=2), guard=DivergenceGuard(1000.0), card={})
    run.guard.check(1.25, 0, 0)  # the first loss of the run: what divergence is judged against
    saved = Run.common_state(run)
    assert saved["lr_policy"]["warmup_epochs"] == 6
    resumed, guard = grescale.GreScale(grescale.Config(), **numbers), DivergenceGuard(1000.0)
    restore(saved, Checkpoints(), TrainState(torch.optim.SGD(model.parameters(), lr=0.1)), resumed, guard, "torch")
    assert resumed.state_dict() == policy.state_dict()
    assert guard.reference == 1.25  # not the first loss after the resume


# --- real runs ---------------------------------------------------------------------------------------------

TINY_DATA = synthetic_data(16, 6)
ACTIONS = ('<module name="train_strategy_def">'
           '<action class="extensible" type="dist_strategy"><value>ring_allreduce</value></action>'
           '<action class="extensible" type="lr_policy"><value>grescale</value>'
           '<value name="warmup_epochs">1</value></action></module>')


def tiny_job(path: Path, output: str, deterministic: bool = True) -> Path:
    return write_job(path, degree=2, output=output, arch=TINY_UNET, data=TINY_DATA, actions=ACTIONS, extra=QUIET,
                     hyper={"minibatch_size": 2, "end_epoch": 2, "lr": 0.05, "optimiser": "sgd",
                            "deterministic": str(deterministic).lower()})


def autocnnp(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "autocnnp", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def final_model(out: Path) -> dict[str, torch.Tensor]:
    latest = (out / "checkpoints" / "latest").read_text().strip()
    return torch.load(out / "checkpoints" / Path(latest).name, map_location="cpu", weights_only=False)


@pytest.mark.ranks
def test_deterministic_two_rank_runs_are_bit_identical_and_recorded(tmp_path):
    outs = []
    for name in ("a", "b"):
        job = tiny_job(tmp_path / f"{name}.xml", f"out-{name}")
        result = autocnnp("run", job)
        assert result.returncode == 0, result.stderr[-3000:]
        outs.append(tmp_path / f"out-{name}")
    a, b = (final_model(o) for o in outs)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert (outs[0] / "metrics.csv").read_bytes() == (outs[1] / "metrics.csv").read_bytes()
    assert a["lr_policy"] == b["lr_policy"] and "stabilisation_scale" in a["lr_policy"]

    m = json.loads((outs[0] / "manifest.json").read_text())
    text = (tmp_path / "a.xml").read_text()
    assert m["status"] == "completed" and m["job"]["text"] == text
    assert m["job"]["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    actions = {x["type"]: x for x in m["plan"]["actions"]}
    assert actions["lr_policy"]["implementation"] == "grescale" and actions["lr_policy"]["set_by"] == "job"
    assert actions["lr_policy"]["parameters"]["warmup_epochs"] == 1
    assert actions["communication_init"]["set_by"] == "default" and actions["communication_init"]["origin"] == "built-in"
    assert m["plan"]["hyperparameters"]["deterministic"] is True and m["plan"]["parallelism_degree"] == 2
    assert m["determinism"]["enabled"] is True and m["determinism"]["intra_op_threads"] == 1
    assert m["software"]["torch"] == torch.__version__ and m["software"]["gloo"] is True
    assert m["software"]["python"] and m["software"]["numpy"] and m["software"]["mpi4py"]
    assert "Open MPI" in (m["software"]["mpirun"]["version"] or "") and "Open MPI" in m["software"]["mpi_library"]
    assert m["hardware"]["cpu_logical_cores"] >= 1 and m["hardware"]["memory_bytes"] > 0
    assert m["seeds"]["seed"] == 0 and "1000" in m["seeds"]["per_epoch"]
    data = m["dataset"]
    assert data["format"] == "synthetic" and data["checksum"]["method"] == "parameters"
    assert data["split"]["samples"] == {"train": 16, "valid": 6} and data["augmentation"] == "none"
    assert m["repeats"] == {"count": 1} and m["world"] == {"size": 2, "backend": "gloo"}
    assert m["final_metrics"]["epoch"] == 2 and 0 <= m["final_metrics"]["dice"] <= 1  # metrics.csv counts from 1
    assert [i["status"] for i in m["invocations"]] == ["completed"]
    # the other run's record differs only in paths and times
    other = json.loads((outs[1] / "manifest.json").read_text())
    assert other["dataset"]["checksum"] == data["checksum"] and other["final_metrics"] == m["final_metrics"]


@pytest.mark.ranks
def test_repeat_runs_seeds_and_summarises(tmp_path):
    job = tiny_job(tmp_path / "job.xml", "out", deterministic=False)
    result = autocnnp("run", "--repeat", "2", job)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    assert "mean" in result.stdout and "std" in result.stdout and "seed 1" in result.stdout
    rows = list(csv.DictReader(open(out / "repeats.csv")))
    assert [r["seed"] for r in rows] == ["0", "1", "mean", "std"]
    dice = [float(r["dice"]) for r in rows[:2]]
    assert float(rows[2]["dice"]) == pytest.approx(sum(dice) / 2)
    assert float(rows[3]["dice"]) == pytest.approx(abs(dice[0] - dice[1]) / 2 ** 0.5)
    for index, seed in enumerate((0, 1)):
        m = json.loads((out / f"seed-{seed}" / "manifest.json").read_text())
        assert m["seeds"]["seed"] == seed and m["status"] == "completed"
        assert m["repeats"]["count"] == 2 and m["repeats"]["index"] == index and m["repeats"]["seeds"] == [0, 1]
        assert m["job"]["overrides"]["seed"] == str(seed)
    top = json.loads((out / "manifest.json").read_text())
    assert top["kind"] == "repeat set" and set(top["summary"]) >= {"dice", "mean_iou"}
    again = autocnnp("run", "--repeat", "2", job)  # finished seeds are not trained again
    assert again.returncode == 0 and again.stdout.count("finished already") == 2
