"""Virtual ranks (<parallelism-degree virtual="k">): one process emulating k ranks takes the steps k real
ranks take (weights, running statistics), hands over to real ranks through its checkpoints, counts as k
ranks wherever the degree matters, and is refused where accumulating micro-batches is not what the
strategy's ranks would do."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from jobfiles import QUIET, TINY_UNET, synthetic_data, write_job
from test_strategies import ARCH, RING, dist_strategy, final_params, metrics, train

from autocnnp.core.errors import JobError
from autocnnp.core.world import World
from autocnnp.generator.assemble import assemble
from autocnnp.generator.overrides import degree_overrides, read_variant
from autocnnp.generator.protocols import shard_sampler
from autocnnp.training.virtual import VirtualShards

DEMO = Path(__file__).resolve().parents[1] / "xml_configs" / "demo.xml"
BATCHNORM = ARCH.replace('"norm">none', '"norm">batch')
# one CPU thread per process in both runs: the kernels then sum in the same order (with more threads a
# process's convolution gradients sum differently, which Adam's step amplifies past 1e-5)
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def run(folder: Path, strategy: str = RING, **kw) -> Path:
    return train(folder, strategy, env=ONE_THREAD, **kw)


def assert_same_weights(out: Path, ref: Path, rel: float = 1e-5) -> None:
    """Every tensor of the final checkpoints (parameters and BatchNorm buffers) within ``rel`` of the
    reference's largest value."""
    want = final_params(ref)
    for name, p in final_params(out).items():
        q = want[name]
        scale = max(q.double().abs().max().item(), 1e-12)
        assert (p.double() - q.double()).abs().max().item() <= rel * scale, name


@pytest.fixture(scope="module")
def real_sgd_bn(tmp_path_factory) -> Path:
    """2 real ranks, SGD with momentum, BatchNorm: 16 samples, minibatch 2, 2 epochs = 8 steps."""
    return run(tmp_path_factory.mktemp("real"), arch=BATCHNORM, momentum=0.9)


CASES = {  # name -> (architecture, hyperparameters)
    "adam, batchnorm": (BATCHNORM, {"optimiser": "adam", "lr": 0.01}),
    "sgd momentum, no norm": (ARCH, {"momentum": 0.9}),
    "adam, no norm": (ARCH, {"optimiser": "adam", "lr": 0.01}),
}


@pytest.mark.ranks
def test_one_process_of_two_virtual_ranks_takes_the_steps_of_two_real_ranks(real_sgd_bn, tmp_path):
    """SGD with momentum and BatchNorm: weights and running statistics (virtual rank 0's, as DDP keeps real
    rank 0's) after 8 steps within 1e-5, the same losses."""
    virtual = run(tmp_path, degree=1, virtual=2, arch=BATCHNORM, momentum=0.9)
    assert_same_weights(virtual, real_sgd_bn)
    assert final_params(virtual)["down.0.1.num_batches_tracked"].item() == 8  # one update per step, not per micro-batch
    for got, want in zip(metrics(virtual), metrics(real_sgd_bn)):
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-5)
    manifest = json.loads((virtual / "manifest.json").read_text())
    assert (manifest["plan"]["parallelism_degree"], manifest["plan"]["processes"]) == (2, 1)


@pytest.mark.ranks
@pytest.mark.parametrize("case", CASES)
def test_virtual_ranks_match_real_ranks_with_each_optimizer_and_norm(case, tmp_path):
    arch, hyper = CASES[case]
    real = run(tmp_path / "real", arch=arch, **hyper)
    virtual = run(tmp_path / "virtual", degree=1, virtual=2, arch=arch, **hyper)
    assert_same_weights(virtual, real)


@pytest.mark.ranks
def test_a_virtual_run_resumes_on_real_ranks(real_sgd_bn, tmp_path):
    """Epoch 1 on one process of 2 virtual ranks (mpi strategy), epoch 2 from its checkpoint on 2 real ranks
    (ring_allreduce): the 2-rank run's weights."""
    run(tmp_path, dist_strategy("<value>mpi</value>"), degree=1, virtual=2, arch=BATCHNORM, momentum=0.9, end_epoch=1)
    out = run(tmp_path, arch=BATCHNORM, momentum=0.9)
    assert [r["epoch"] for r in metrics(out)] == [1, 2]
    assert_same_weights(out, real_sgd_bn)


def test_each_virtual_rank_reads_the_shard_of_the_real_rank_it_stands_for():
    data = list(range(35))  # 6 shards of 6, padded
    shards = VirtualShards(data, World(rank=1, world_size=2), 3, 2, shuffle=True, seed=5)
    shards.set_epoch(4)
    order = list(shards)
    assert len(order) == len(shards) == 3 * 6
    for j in range(3):
        real = shard_sampler(data, num_replicas=6, rank=3 + j, shuffle=True, seed=5)
        real.set_epoch(4)
        mine = [i for start in range(0, 18, 6) for i in order[start + 2 * j:start + 2 * j + 2]]
        assert mine == list(real)  # minibatches of 2, interleaved: rank 3's, 4's, 5's, then 3's again


def test_the_degree_is_processes_times_virtual_ranks_everywhere():
    gen = assemble(read_variant(DEMO, {"parallelism-degree": "2", "parallelism-degree.virtual": "9",
                                       "data.train_samples": "144", "hyperparameters.minibatch_size": "2"}))
    assert (gen.world_size, gen.virtual_ranks, gen.ranks, gen.replicas()) == (2, 9, 18, 18)
    assert gen.steps_per_epoch(144) == 4  # 8 samples per virtual rank, minibatch 2
    assert gen.lr_policy(4).target_lr == pytest.approx(0.003 * 18)
    assert degree_overrides(18, 2) == {"parallelism-degree": "2", "parallelism-degree.virtual": "9"}
    assert degree_overrides(1, 2) == {"parallelism-degree": "1", "parallelism-degree.virtual": "1"}
    with pytest.raises(ValueError, match="4 processes cannot emulate 18 ranks"):
        degree_overrides(18, 4)


REFUSED = {  # overrides -> what the one-line refusal says
    "tensorflow": ({"framework": "tensorflow"}, "trains no virtual ranks"),
    "horovod": ({"dist_strategy": "horovod"}, "DistributedOptimizer exchanges the gradients in each backward"),
    "sync_batchnorm": ({"dist_strategy.sync_batchnorm": "true"}, "sync_batchnorm takes BatchNorm statistics"),
    "fedavg": ({"dist_strategy": "fedavg"}, "not every rank's gradient makes each step"),
    "dedicated server": ({"dist_strategy": "parameter_server", "dist_strategy.server": "dedicated"},
                         "not every rank's gradient makes each step"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_virtual_ranks_are_refused_in_one_line_where_they_are_not_the_strategy(name):
    sets, why = REFUSED[name]
    with pytest.raises(JobError) as err:
        assemble(read_variant(DEMO, {**sets, "parallelism-degree.virtual": "3"}))
    assert why in str(err.value) and "virtual=\"3\"" in str(err.value) and "\n" not in str(err.value)
    assemble(read_variant(DEMO, {**sets, "parallelism-degree.virtual": "1"}))  # one rank per process: as before


def test_the_job_file_attribute_the_plan_and_lr_plot(job, cli, capsys):
    path = job(("<parallelism-degree>2</parallelism-degree>", '<parallelism-degree virtual="7">2</parallelism-degree>'))
    rc, out, err = cli("plan", path)
    assert rc == 0, err
    assert "parallelism-degree: 14 (2 process(es) x 7 virtual)" in out
    rc, out, err = cli("lr-plot", path, "--out", path.with_suffix(".png"), "--policy", "linear_scaling")
    assert rc == 0 and "x 14 replicas" in out, err
    rc, _, err = cli("validate", path, "--set", "parallelism-degree.virtual=0")
    assert rc == 2 and "virtual" in err
    rc, _, err = cli("tune", path, "--processes", "4")
    assert rc == 2 and err.count("cannot emulate") == 1, err
    assert "--processes: 4 processes cannot emulate 14 ranks: each process emulates the same number of virtual " \
        "ranks. Hint: give a divisor of 14" in err
    with pytest.raises(SystemExit) as exited:  # refused as it is read (it fell back to the job's degree)
        cli("tune", path, "--processes", "0")
    assert exited.value.code == 2 and "--processes: must be at least 1" in capsys.readouterr().err


@pytest.mark.ranks
@pytest.mark.slow
def test_tune_at_18_virtual_ranks_on_2_processes(tmp_path):
    """The guideline's tuning branch (--ranks-threshold 12) at 18 ranks, emulated by 2 processes of 9 virtual
    ranks each, against a 1-rank baseline, in a reduced form: 1 epoch of 36 samples, a budget of 3 runs (about
    a minute on 2 idle cores)."""
    job = write_job(tmp_path / "job.xml", degree=1, output="out", arch=TINY_UNET, extra=QUIET,
                    data=synthetic_data(36, 8, kind="brain", size=16),
                    hyper={"minibatch_size": 2, "end_epoch": 1, "lr": 0.05, "optimiser": "sgd"})
    result = subprocess.run([sys.executable, "-m", "autocnnp", "tune", str(job), "--ranks-threshold", "12",
                             "--processes", "2", "--budget", "3", "--set", "parallelism-degree=18"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    tune = tmp_path / "out" / "tune"
    rows = list(csv.DictReader(open(tune / "tune.csv")))
    assert [(r["iteration"], r["ranks"]) for r in rows] == [("0", "18"), ("1", "18"), ("baseline", "1")]
    assert rows[1]["action"] == "Decrease the initial Lr value"
    run = next(p for p in (tune / "runs").iterdir() if p.name.startswith("iter-0"))
    plan = json.loads((run / "manifest.json").read_text())["plan"]
    assert (plan["parallelism_degree"], plan["processes"], plan["virtual_ranks"]) == (18, 2, 9)


def test_the_check_before_launch_counts_virtual_ranks(cli, tmp_path, nothing_starts):
    job = write_job(tmp_path / "job.xml", degree=1, virtual=4, arch=TINY_UNET, extra=QUIET,
                    data=synthetic_data(16, 4), hyper={"minibatch_size": 8})
    rc, _, err = cli("run", job)
    assert rc == 2 and "each rank gets 4 of the 16 training samples, fewer than one minibatch of 8" in err
