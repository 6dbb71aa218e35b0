"""Distributed optimizers are swappable: one conformance suite over the dist_strategy implementations,
each run on 2 real ranks with `autocnnp run` (mpirun), plus the engine's dependency fitting."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from jobfiles import data_3d, small_tubes, strategy_module, write_job

AUTOCNNP = [sys.executable, "-m", "autocnnp"]
PLUGINS = Path(__file__).resolve().parent / "plugins"

HYPER = dict(minibatch_size=2, end_epoch=2, lr=0.05, optimiser="sgd")  # the thesis spelling
DATA = ('<data format="synthetic"><param name="kind">atrium</param><param name="train_samples">16</param>'
        '<param name="valid_samples">6</param><param name="size">16</param></data>')
ARCH = ('<CNN_archi name="unet"><param name="depth">2</param><param name="base_channels">4</param>'
        '<param name="norm">none</param></CNN_archi>')
RING = '<action class="extensible" type="dist_strategy"><value>ring_allreduce</value></action>'
QUIET = ('<monitoring><property name="plots">false</property><property name="tensorboard">false</property>'
         '<property name="progress">false</property></monitoring>')  # metrics.csv only: less CPU per run

# A checkpoint plug-in that records, on every rank, whether a torch.distributed process group exists.
PROBE = """
import os
import torch.distributed as dist

def Probe(epoch, metrics, state):
    rank = os.environ["OMPI_COMM_WORLD_RANK"]
    with open(os.path.join(os.path.dirname(__file__), f"torch_distributed_{rank}.txt"), "w") as f:
        f.write(str(dist.is_available() and dist.is_initialized()))
"""

# A strategy written outside the package, named by file in the job (default symbol Strategy).
USER_STRATEGY = '''"""My own allreduce: DDP with a smaller bucket, and a typed parameter of its own."""
from autocnnp.components.strategies import ring_allreduce


class Strategy(ring_allreduce.RingAllreduce):
    def __init__(self, *, world, device, beat, bucket_mb: float = 1.0):
        super().__init__(ring_allreduce.Config(bucket_cap_mb=bucket_mb), world=world, device=device, beat=beat)
'''


def dist_strategy(value: str, **params) -> str:
    named = "".join(f'<value name="{k}">{v}</value>' for k, v in params.items())
    return f'<action class="extensible" type="dist_strategy">{value}{named}</action>'


def actions(strategy: str, comm: str | None = None, probe: bool = False, lr_policy: str = "constant") -> str:
    env = ('<module name="train_env_def"><action class="non_extensible" type="communication_init">'
           f'<value>{comm}</value></action></module>') if comm else ""
    ckpt = ('<action class="extensible" type="checkpoint"><value>periodic</value>'
            '<value name="Probe"><path>probe.py</path></value></action>') if probe else ""
    return env + strategy_module(lr_policy=lr_policy, extra=ckpt).replace(RING, strategy)


def train(folder: Path, strategy: str, *, comm: str | None = None, degree: int = 2, env: dict | None = None,
          probe: bool = False, lr_policy: str = "constant", virtual: int = 1, arch: str = ARCH, data: str = DATA,
          **hyper) -> Path:
    """Run a job with ``strategy`` in ``folder`` on ``degree`` processes of ``virtual`` ranks; returns its
    output folder."""
    folder.mkdir(parents=True, exist_ok=True)
    if probe:
        (folder / "probe.py").write_text(PROBE)
    job = write_job(folder / "job.xml", degree=degree, output="out", arch=arch, data=data, extra=QUIET, virtual=virtual,
                    actions=actions(strategy, comm, probe, lr_policy), hyper={**HYPER, **hyper})
    result = subprocess.run([*AUTOCNNP, "run", str(job)], capture_output=True, text=True, timeout=180,
                            env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return folder / "out"


def metrics(out: Path) -> list[dict[str, float]]:
    with open(out / "metrics.csv") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def final_params(out: Path) -> dict[str, torch.Tensor]:
    latest = (out / "checkpoints" / "latest").read_text().strip()
    return torch.load(out / "checkpoints" / Path(latest).name, map_location="cpu", weights_only=False)["model"]


def assert_same_run(out: Path, ref: Path) -> None:
    """Same per-epoch training loss and the same final parameters (up to summation order)."""
    got, want = metrics(out), metrics(ref)
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want]
    for a, b in zip(got, want):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["valid_loss"] == pytest.approx(b["valid_loss"], rel=1e-5)
    ref_params = final_params(ref)
    for name, p in final_params(out).items():
        torch.testing.assert_close(p, ref_params[name], rtol=1e-4, atol=1e-5, msg=name)


def assert_learns(out: Path) -> None:
    rows = metrics(out)
    assert rows[-1]["train_loss"] < 0.9 * rows[0]["train_loss"], rows
    assert rows[-1]["valid_loss"] < rows[0]["valid_loss"], rows


@pytest.fixture(scope="module")
def ring(tmp_path_factory) -> Path:
    """The reference: ring_allreduce (torch DDP) on 2 ranks."""
    return train(tmp_path_factory.mktemp("ring"), RING)


@pytest.fixture(scope="module")
def demo_plugin(tmp_path_factory) -> Path:
    """autocnnp-demo-plugin installed with pip into a private folder (the workers get it on PYTHONPATH)."""
    src = tmp_path_factory.mktemp("src") / "autocnnp_demo_plugin"
    shutil.copytree(PLUGINS / "autocnnp_demo_plugin", src)
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "--no-index", "--target", str(target), str(src)],
                   check=True, capture_output=True)
    return target


def user_file(folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "my_strategy.py").write_text(USER_STRATEGY)
    return dist_strategy("<value><path>my_strategy.py</path></value>", bucket_mb=0.5)


# name -> (dist_strategy action or a function of the job folder giving it, needs the installed plug-in)
SYNCHRONOUS = {
    "mpi": (dist_strategy("<value>mpi</value>", bucket_cap_mb=0.1), False),
    "parameter_server shared": (dist_strategy("<value>parameter_server</value>", server="shared"), False),
    "file my_strategy.py": (user_file, False),
    "entry point my_ring": (dist_strategy("<value>my_ring</value>", chunks=3), True),
}


@pytest.mark.ranks
@pytest.mark.parametrize("name", SYNCHRONOUS)
def test_synchronous_strategies_reproduce_ring_allreduce(name, ring, tmp_path, request):
    strategy, plugin = SYNCHRONOUS[name]
    env = {}
    if plugin:
        target = request.getfixturevalue("demo_plugin")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))
    if callable(strategy):
        strategy = strategy(tmp_path)
    probe = name in ("mpi", "parameter_server shared")
    out = train(tmp_path, strategy, env=env, probe=probe)
    assert_same_run(out, ring)
    assert_learns(out)
    if probe:  # MPI-only strategies never create a torch.distributed process group
        assert [(tmp_path / f"torch_distributed_{r}.txt").read_text() for r in (0, 1)] == ["False", "False"]


@pytest.mark.ranks
def test_3d_patches_train_alike_with_every_synchronous_strategy(tmp_path, tmp_path_factory):
    """A 3D U-Net on 3D patches: the synchronous strategies give ring_allreduce's run (they see gradients, whatever
    the dimension), and fedavg trains it too."""
    data, arch = data_3d(small_tubes(tmp_path_factory)), ARCH.replace('"unet"', '"unet3d"')
    ring3d = train(tmp_path / "ring", RING, arch=arch, data=data)
    for name in ("mpi", "parameter_server shared"):
        assert_same_run(train(tmp_path / name, SYNCHRONOUS[name][0], arch=arch, data=data), ring3d)
    fedavg = train(tmp_path / "fedavg", dist_strategy("<value>fedavg</value>"), arch=arch, data=data)
    assert torch.load(fedavg / "checkpoints" / "ckpt-epoch0002.pt", weights_only=False)["model_card"]["input"][
        "dimension"] == "3d"


@pytest.mark.ranks
def test_dedicated_parameter_server_trains_like_its_single_worker(tmp_path):
    """With 2 ranks, server=dedicated has one worker: it must follow a 1-rank run step for step, the server
    applying every update (rank 0 only computes gradients; its checkpoint holds the server's optimizer)."""
    out = train(tmp_path / "ps", dist_strategy("<value>parameter_server</value>", server="dedicated"))
    one = train(tmp_path / "one", RING, degree=1)
    assert_same_run(out, one)
    assert_learns(out)
    latest = (out / "checkpoints" / "latest").read_text().strip()
    saved = torch.load(out / "checkpoints" / Path(latest).name, map_location="cpu", weights_only=False)
    assert saved["optimizer_type"] == "SGD" and saved["optimizer"]["state"]  # the server's momentum buffers


@pytest.mark.ranks
def test_fedavg_converges_and_is_the_same_over_torch_distributed_and_mpi(tmp_path, cli):
    # gradual_warmup scales with the replicas of a step: one for federated averaging, so the lr stays the base lr
    out = train(tmp_path / "gloo", dist_strategy("<value>fedavg</value>"), lr_policy="gradual_warmup")
    rows = metrics(out)
    assert_learns(out)
    assert rows[-1]["dice"] >= rows[0]["dice"], rows  # (this tiny task stays at background for 2 epochs)
    assert [r["lr"] for r in rows] == [HYPER["lr"]] * len(rows)
    rc, text, err = cli("lr-plot", tmp_path / "gloo" / "job.xml", "--out", tmp_path / "lr.png")  # the same builder
    assert rc == 0 and f"x 1 replicas = {HYPER['lr']:g}" in text, err
    mpi = train(tmp_path / "mpi", dist_strategy("<value>fedavg</value>"), comm="mpi4py", lr_policy="gradual_warmup")
    assert_same_run(mpi, out)


def test_fedavg_partitions_are_fixed_disjoint_and_cover_the_data():
    from autocnnp.components.strategies.fedavg import PartitionSampler

    parts = [PartitionSampler(17, r, 3, shuffle=True, seed=0) for r in range(3)]
    assert [len(p) for p in parts] == [6, 6, 5]
    seen = []
    for p in parts:
        p.set_epoch(0)
        first = list(p)
        p.set_epoch(1)
        assert sorted(list(p)) == sorted(first)  # the same samples every epoch, reshuffled
        seen += first
    assert sorted(seen) == list(range(17))


def test_plan_switches_communication_init_with_the_strategy(job, cli):
    """Changing only the dist_strategy action changes the communication init the engine picks."""
    picked = {}
    for strategy in ("ring_allreduce", "mpi", "parameter_server", "fedavg"):
        rc, out, err = cli("plan", job(("<value>ring_allreduce</value>", f"<value>{strategy}</value>"),
                                       name=f"{strategy}.xml"))
        assert rc == 0, err
        line = next(text for text in out.splitlines() if "- communication_init" in text)
        picked[strategy] = line.split("= ")[1].strip()
    assert picked == {"ring_allreduce": "torch_distributed  (built-in, default)",
                      "mpi": "mpi4py  (built-in, chosen by the engine)",
                      "parameter_server": "mpi4py  (built-in, chosen by the engine)",
                      "fedavg": "torch_distributed  (built-in, default)"}


def test_conflicting_communication_init_is_refused(job, cli):
    comm = ('<action class="non_extensible" type="communication_init"><value>torch_distributed</value></action>\n'
            '        <action class="non_extensible" type="device_placement">')
    path = job(("<value>ring_allreduce</value>", "<value>mpi</value>"),
               ('<action class="non_extensible" type="device_placement">', comm))
    rc, _, err = cli("run", path)
    assert rc == 2
    assert "dist_strategy 'mpi' needs communication_init 'mpi4py', but the job sets 'torch_distributed'" in err
    assert not (path.parent / "runs").exists()  # nothing started


class OtherRankAllOnes:
    """MPI.COMM_WORLD of 2 ranks as rank 0 sees it when the other rank's gradients are all 1."""

    size = 2
    IN_PLACE, SUM = object(), object()

    def Allreduce(self, sendbuf, recvbuf, op):  # noqa: N802 -- mpi4py's name
        assert sendbuf is self.IN_PLACE and op is self.SUM
        recvbuf += 1


def test_mpi_buckets_average_gradients_into_views_of_the_bucket():
    """The mpi strategy's buckets: each gradient becomes the mean over the ranks, as a view of its bucket
    (nothing copied back); gradients accumulated into those views (zero_grad without set_to_none) and fresh
    ones (set_to_none) are both averaged right in the following steps."""
    from autocnnp.components.strategies.mpi import make_buckets

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 8))
    buckets = make_buckets(net, cap_mb=0.05)  # 51 KiB: the 64 KiB weight of the first layer on its own
    assert [[tuple(p.shape) for p in b.params] for b in buckets] == [[(8,), (8, 256), (256,)], [(256, 64)]]
    comm = OtherRankAllOnes()
    for set_to_none in (True, False, True):
        net.zero_grad(set_to_none=set_to_none)
        net(torch.randn(4, 64)).square().mean().backward()
        expected = [(p.grad + 1) / 2 for p in net.parameters()]
        for b in buckets:
            b.average(comm, comm)
        for p, want in zip(net.parameters(), expected):
            assert torch.equal(p.grad, want)
        for b in buckets:
            start, end = b.flat.data_ptr(), b.flat.data_ptr() + b.flat.numel() * 4
            assert all(start <= p.grad.data_ptr() < end for p in b.params)
