"""Real distributed runs: `autocnnp run` starting `mpirun -np 2` workers over gloo."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from jobfiles import data_3d, small_tubes, strategy_module, write_job

AUTOCNNP = [sys.executable, "-m", "autocnnp"]


def run(job: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([*AUTOCNNP, "run", str(job)], capture_output=True, text=True, timeout=timeout)


def metrics(out: Path) -> list[dict]:
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


def final_params(out: Path) -> dict[str, torch.Tensor]:
    latest = (out / "checkpoints" / "latest").read_text().strip()
    return torch.load(out / "checkpoints" / Path(latest).name, map_location="cpu", weights_only=False)["model"]


SMALL = dict(minibatch_size=2, end_epoch=2, lr=0.05, optimiser="sgd")
SMALL_DATA = ('<data format="synthetic"><param name="kind">atrium</param><param name="train_samples">16</param>'
              '<param name="valid_samples">6</param><param name="size">16</param></data>')
PLAIN_UNET = '<CNN_archi name="unet"><param name="depth">2</param><param name="base_channels">4</param>' \
             '<param name="norm">none</param></CNN_archi>'


@pytest.mark.ranks
def test_two_rank_run_writes_metrics_checkpoints_plots_and_resources(tmp_path):
    job = write_job(tmp_path / "job.xml", output="out", arch=PLAIN_UNET, data=SMALL_DATA, hyper=SMALL)
    result = run(job)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    rows = metrics(out)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for key in ("train_loss", "valid_loss", "dice", "pixel_accuracy", "mean_accuracy", "mean_iou", "fw_iou"):
        assert 0 <= float(rows[-1][key]) < 10, key
    assert sorted(p.name for p in (out / "resources").iterdir()) == ["rank0.csv", "rank1.csv"]
    assert (out / "plots" / "learning_curves.png").stat().st_size > 1000
    assert list((out / "tensorboard").iterdir())
    assert final_params(out)


PLAIN_UNET3D = PLAIN_UNET.replace('"unet"', '"unet3d"')


@pytest.fixture(scope="module")
def tubes(tmp_path_factory) -> Path:
    return small_tubes(tmp_path_factory)


@pytest.mark.ranks
@pytest.mark.parametrize("norm,sync,dims", [("none", "false", "2d"), ("batch", "true", "2d"), ("none", "false", "3d")])
def test_two_ranks_match_one_rank_with_double_batch(tmp_path, norm, sync, dims, request):
    """The data-parallel oracle: 2 ranks x batch b == 1 rank x batch 2b after k steps (2D slices, 3D patches)."""
    arch = (PLAIN_UNET if dims == "2d" else PLAIN_UNET3D).replace(">none<", f">{norm}<")
    data = SMALL_DATA if dims == "2d" else data_3d(request.getfixturevalue("tubes"))
    extra = (f'<action class="extensible" type="dist_strategy"><value>ring_allreduce</value>'
             f'<value name="sync_batchnorm">{sync}</value></action>')
    env = '<module name="train_env_def"></module>'
    outs = {}
    for degree, batch in ((2, 2), (1, 4)):
        actions = env + strategy_module(lr_policy="constant").replace(
            '<action class="extensible" type="dist_strategy"><value>ring_allreduce</value></action>', extra)
        job = write_job(tmp_path / f"job{degree}.xml", degree=degree, output=f"out{degree}", arch=arch,
                        actions=actions, data=data, hyper={**SMALL, "minibatch_size": batch, "end_epoch": 1})
        result = run(job)
        assert result.returncode == 0, result.stderr[-3000:]
        outs[degree] = final_params(tmp_path / f"out{degree}")
    init = write_job(tmp_path / "jobinit.xml", degree=1, output="init", arch=arch, data=data,
                     hyper={**SMALL, "lr": 1e-12, "end_epoch": 1})
    assert run(init).returncode == 0
    initial = final_params(tmp_path / "init")
    moved = 0.0
    for name, p in outs[1].items():
        torch.testing.assert_close(outs[2][name], p, rtol=1e-4, atol=1e-5, msg=name)
        moved = max(moved, (p.float() - initial[name].float()).abs().max().item())
    assert moved > 1e-3  # the runs really trained


@pytest.mark.ranks
@pytest.mark.parametrize("dims", ["2d", pytest.param("3d", marks=pytest.mark.slow)])
def test_resume_continues_the_loss_curve_even_with_other_rank_count(tmp_path, dims, request):
    arch, data = (PLAIN_UNET, SMALL_DATA) if dims == "2d" else (PLAIN_UNET3D, data_3d(request.getfixturevalue("tubes")))
    full = write_job(tmp_path / "full.xml", output="full", arch=arch, data=data, hyper={**SMALL, "end_epoch": 3})
    assert run(full).returncode == 0
    part = write_job(tmp_path / "part.xml", output="part", arch=arch, data=data, hyper={**SMALL, "end_epoch": 2})
    assert run(part).returncode == 0
    rest = write_job(tmp_path / "part.xml", output="part", arch=arch, data=data, hyper={**SMALL, "end_epoch": 3})
    assert run(rest).returncode == 0
    a, b = metrics(tmp_path / "full"), metrics(tmp_path / "part")
    assert [r["epoch"] for r in b] == ["1", "2", "3"]
    for ra, rb in zip(a, b):
        assert float(ra["train_loss"]) == pytest.approx(float(rb["train_loss"]), rel=1e-5)
        assert float(ra["valid_loss"]) == pytest.approx(float(rb["valid_loss"]), rel=1e-5)
    one_rank = write_job(tmp_path / "part.xml", degree=1, output="part", arch=arch, data=data,
                         hyper={**SMALL, "end_epoch": 4})
    result = run(one_rank)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["epoch"] for r in metrics(tmp_path / "part")] == ["1", "2", "3", "4"]


FAIL_PLUGIN = """
import os, time
def Fail(epoch, metrics, state):
    if os.environ.get("OMPI_COMM_WORLD_RANK") == "1":
        {action}
"""


@pytest.mark.ranks
@pytest.mark.parametrize("action,expect", [
    ("raise RuntimeError('injected failure')", "rank 1 failed"),
    ("os._exit(7)", "rank 1 exited without reporting"),
    ("time.sleep(600)", "rank 1 stopped responding"),
])
def test_a_failing_rank_ends_the_whole_job_naming_it(tmp_path, action, expect):
    (tmp_path / "fail.py").write_text(FAIL_PLUGIN.format(action=action))
    ckpt = ('<action class="extensible" type="checkpoint"><value>periodic</value>'
            '<value name="Fail"><path>fail.py</path></value></action>')
    job = write_job(tmp_path / "job.xml", output="out", arch=PLAIN_UNET, data=SMALL_DATA,
                    actions=strategy_module(extra=ckpt), hyper={**SMALL, "end_epoch": 5},
                    extra='<cluster><property name="rank_timeout_s">5</property></cluster>')
    started = time.monotonic()
    result = run(job, timeout=120)
    assert time.monotonic() - started < 60
    assert result.returncode != 0
    assert expect in result.stderr + result.stdout
    blame = next(line for line in result.stderr.splitlines() if line.startswith("autocnnp: the job failed"))
    assert "rank 0" not in blame, blame  # its victim (taken down by the launcher or a lost peer) is not named
    assert len(metrics(tmp_path / "out")) <= 1


@pytest.mark.ranks
def test_two_jobs_on_one_machine_do_not_collide(tmp_path):
    """Each job's rank 0 picks its own free port, so simultaneous jobs rendezvous separately."""
    jobs = [write_job(tmp_path / f"job{i}.xml", output=f"out{i}", arch=PLAIN_UNET, data=SMALL_DATA,
                      hyper={**SMALL, "end_epoch": 1}) for i in range(2)]
    procs = [subprocess.Popen([*AUTOCNNP, "run", str(j)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for j in jobs]
    results = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    assert all(len(metrics(tmp_path / f"out{i}")) == 1 for i in range(2))


@pytest.mark.ranks
def test_missing_mpirun_gets_an_install_hint(tmp_path):
    job = write_job(tmp_path / "job.xml", output="out", arch=PLAIN_UNET, data=SMALL_DATA)
    env = {"PATH": str(tmp_path), "HOME": str(tmp_path)}  # no mpirun on this PATH
    result = subprocess.run([*AUTOCNNP, "run", str(job)], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2
    assert "mpirun (Open MPI) is not installed" in result.stderr and "apt-get install openmpi-bin" in result.stderr
    assert not (tmp_path / "out").exists()


def test_hostfile_reaches_the_mpirun_command(tmp_path):
    from autocnnp.run.job import load_job
    from autocnnp.run.launch import build_command

    (tmp_path / "hosts").write_text("localhost slots=2\n")
    job = write_job(tmp_path / "job.xml", extra='<cluster><property name="hostfile">hosts</property>'
                    '<property name="launcher">mpirun</property></cluster>')
    cmd, _ = build_command(load_job(job), env={})
    assert cmd[:3] == ["mpirun", "-np", "2"]
    assert cmd[cmd.index("--hostfile") + 1] == str(tmp_path / "hosts")


SLEEPY_NET = """import os
import time

import torch

DELAY_S = {delays}  # seconds each rank's forward pass sleeps: a rank made slow on purpose


class Sleepy(torch.nn.Conv2d):
    def forward(self, x):
        if self.training:
            time.sleep(DELAY_S[int(os.environ["OMPI_COMM_WORLD_RANK"])])  # the rank mpirun started
        return super().forward(x)


def build(in_channels, num_classes):
    return Sleepy(in_channels, num_classes, 3, padding=1)
"""


@pytest.mark.ranks
@pytest.mark.parametrize("strategy,delays,flagged", [("ring_allreduce", {0: 0.04, 1: 0.04}, []),
                                                     ("ring_allreduce", {0: 0.04, 1: 0.16}, [1]),
                                                     ("mpi", {0: 0.04, 1: 0.16}, [1])])
def test_a_slow_rank_is_flagged_under_synchronous_allreduce(tmp_path, strategy, delays, flagged):
    """A synchronous all-reduce (DDP's overlapped buckets, mpi's blocking Allreduce) makes every rank's step wait
    for the slowest: the watch compares the ranks' own work (their steps less the time blocked in the
    collectives), so the slow rank stands out and balanced ranks don't."""
    (tmp_path / "net.py").write_text(SLEEPY_NET.format(delays=delays))
    job = write_job(tmp_path / "job.xml", output="out", arch="<CNN_archi><path>net.py</path></CNN_archi>",
                    data=SMALL_DATA, hyper=SMALL, actions=strategy_module(strategy))
    result = run(job)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [s["rank"] for s in manifest.get("stragglers", [])] == flagged, result.stderr[-3000:]
    assert ("rank 1 is a straggler: its own work per step" in result.stderr) == bool(flagged)
    with open(tmp_path / "out" / "resources" / "rank0.csv") as f:
        waits = [float(row["collective_wait_ms"]) for row in csv.DictReader(f) if row["collective_wait_ms"]]
    assert waits and (max(waits) > 80) == bool(flagged)  # rank 0 waits for rank 1's extra 120 ms every step
