"""dist_strategy horovod: real 2-rank runs (mpirun through `autocnnp run`, and horovodrun) compared with
ring_allreduce, the engine choosing communication_init horovod, and the message when Horovod is missing.

Horovod is no pinned dependency: `make horovod` builds it (cluster/build-horovod.sh). Tests that need it
are skipped where it cannot be imported, unless AUTOCNNP_REQUIRE_HOROVOD is set (CI sets it), where that
is a failure.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from jobfiles import require_import, strategy_module, write_job
from test_distributed import PLAIN_UNET, SMALL, SMALL_DATA, final_params, metrics, run

AUTOCNNP = [sys.executable, "-m", "autocnnp"]


@pytest.fixture(scope="module")
def horovod() -> None:
    """Skip (or, with AUTOCNNP_REQUIRE_HOROVOD set, fail) unless `import horovod.torch` works here."""
    require_import("horovod.torch", "horovod", "AUTOCNNP_REQUIRE_HOROVOD")


def horovod_job(path: Path, *, output: str, strategy: str = "horovod", hyper: dict | None = None,
                env_module: str = "") -> Path:
    return write_job(path, output=output, arch=PLAIN_UNET, data=SMALL_DATA, hyper={**SMALL, **(hyper or {})},
                     actions=env_module + strategy_module(strategy, "constant"))


def assert_same_training(out: Path, reference: Path) -> None:
    """Per-epoch train_loss and the final parameters of two runs agree (and training really moved them)."""
    rows, ref_rows = metrics(out), metrics(reference)
    assert [r["epoch"] for r in rows] == [r["epoch"] for r in ref_rows] == ["1", "2"]
    for row, ref in zip(rows, ref_rows):
        assert float(row["train_loss"]) == pytest.approx(float(ref["train_loss"]), rel=1e-5)
    params, ref_params = final_params(out), final_params(reference)
    assert params.keys() == ref_params.keys()
    for name, p in ref_params.items():
        torch.testing.assert_close(params[name], p, rtol=1e-4, atol=1e-5, msg=name)


# Adam with weight decay: Horovod's broadcast_optimizer_state would initialise a fresh optimizer with a
# zero-gradient step (one weight-decay step, one Adam step counted); the strategy must not let it.
@pytest.mark.ranks
@pytest.mark.parametrize("hyper", [{}, {"optimiser": "adam", "lr": 1e-3, "weight_decay": 1e-2}],
                         ids=["sgd", "adam-weight-decay"])
def test_two_rank_horovod_run_matches_ring_allreduce(tmp_path, horovod, hyper):
    for strategy in ("horovod", "ring_allreduce"):
        result = run(horovod_job(tmp_path / f"{strategy}.xml", output=strategy, strategy=strategy, hyper=hyper))
        assert result.returncode == 0, result.stderr[-3000:]
    assert_same_training(tmp_path / "horovod", tmp_path / "ring_allreduce")
    untrained = horovod_job(tmp_path / "init.xml", output="init", strategy="ring_allreduce",
                            hyper={**hyper, "lr": 1e-12})
    assert run(untrained).returncode == 0
    initial, trained = final_params(tmp_path / "init"), final_params(tmp_path / "horovod")
    assert max((trained[k] - p).abs().max().item() for k, p in initial.items()) > 1e-4  # the runs really trained


@pytest.mark.ranks
@pytest.mark.parametrize("controller", ["mpi", "gloo"])
def test_horovodrun_starts_the_ranks_in_place(tmp_path, horovod, controller):
    """Under horovodrun the processes are the ranks (Open MPI's variables, or HOROVOD_* with --gloo)."""
    horovodrun = Path(sys.executable).parent / "horovodrun"
    job = horovod_job(tmp_path / "job.xml", output="out")
    flag = ["--gloo"] if controller == "gloo" else []
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    result = subprocess.run([str(horovodrun), *flag, "-np", "2", "-H", "localhost:2", *AUTOCNNP, "run", str(job)],
                            capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert [r["epoch"] for r in metrics(tmp_path / "out")] == ["1", "2"]
    reference = horovod_job(tmp_path / "ref.xml", output="ref", strategy="ring_allreduce")
    assert run(reference).returncode == 0
    assert_same_training(tmp_path / "out", tmp_path / "ref")


def test_plan_chooses_communication_init_horovod(tmp_path):
    job = horovod_job(tmp_path / "job.xml", output="out")
    result = subprocess.run([*AUTOCNNP, "plan", str(job)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert re.search(r"communication_init \[non-extensible\] = horovod\s+\(built-in, chosen by the engine\)",
                     result.stdout), result.stdout
    assert re.search(r"dist_strategy \[extensible\] = horovod\b", result.stdout)


def test_a_job_setting_another_communication_init_is_refused(tmp_path):
    env = ('<module name="train_env_def"><action class="non_extensible" type="communication_init">'
           '<value>torch_distributed</value></action></module>')
    job = horovod_job(tmp_path / "job.xml", output="out", env_module=env)
    result = subprocess.run([*AUTOCNNP, "validate", str(job)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "dist_strategy 'horovod' needs communication_init 'horovod'" in result.stderr


@pytest.mark.ranks
def test_without_horovod_the_run_fails_saying_make_horovod(tmp_path):
    """A Horovod that cannot be imported (shadowed here) ends the job with the install command."""
    shadow = tmp_path / "shadow" / "horovod"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'horovod'\")\n")
    job = horovod_job(tmp_path / "job.xml", output="out")
    path = [str(shadow.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    result = subprocess.run([*AUTOCNNP, "run", str(job)], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode != 0
    assert "run `make horovod`" in result.stdout + result.stderr
