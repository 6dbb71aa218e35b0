"""``autocnnp scale``: the scaling model's arithmetic on hand-computed cases, the strategies' traffic, and the
command on a tiny job (table, plot, JSON) and on bad options."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from autocnnp.cli import main
from autocnnp.components.strategies.fedavg import Config as FedAvgConfig
from autocnnp.components.strategies.fedavg import FedAvg
from autocnnp.components.strategies.parameter_server import Config as ServerConfig
from autocnnp.components.strategies.parameter_server import ParameterServer
from autocnnp.generator.protocols import Strategy, StrategyConfig, Traffic
from autocnnp.tuning import scale as scale_command
from autocnnp.tuning.scaling import (
    DataPath,
    Link,
    Placement,
    Profile,
    bucket_overlap,
    exposed_s,
    powers_of_two,
    predict,
    ring_allreduce_s,
    server_exchange_s,
)

LINK = Link(latency_s=1e-5, bandwidth=1e9)  # 10 us, 1 GB/s: easy to compute by hand
MB = 1_000_000


def profile(compute=0.1, backward=0.06, data=0.0, workers=0, grad_bytes=100 * MB, batch=8, sample_bytes=0):
    return Profile(batch, {1: compute}, {1: backward}, {1: data}, grad_bytes, grad_bytes, sample_bytes, workers, 800)


def ring(traffic_bytes=100 * MB):
    return lambda n: Traffic("ring", traffic_bytes, n)


def test_ring_allreduce_formula():
    # 2(N-1)/N * S/B + 2(N-1) a, with S = 100 MB, B = 1 GB/s, a = 10 us
    assert ring_allreduce_s(100 * MB, 4, LINK) == pytest.approx(2 * 3 / 4 * 0.1 + 6 * 1e-5)
    assert ring_allreduce_s(100 * MB, 1, LINK) == 0.0
    # the bandwidth term tends to 2 S/B: twice the message, whatever the ring's length
    assert ring_allreduce_s(100 * MB, 1024, LINK) == pytest.approx(2 * 1023 / 1024 * 0.1 + 2046e-5)


def test_overlap_hides_communication_behind_backward_up_to_the_last_bucket():
    assert bucket_overlap(100 * MB, 25 * MB) == pytest.approx(0.75)
    assert bucket_overlap(1 * MB, 25 * MB) == 0.0
    assert exposed_s(0.1, backward_s=1.0, overlap=0.75) == pytest.approx(0.025)  # only the last bucket shows
    assert exposed_s(0.1, backward_s=0.04, overlap=0.75) == pytest.approx(0.07)  # backward too short to hide it
    assert exposed_s(0.1, backward_s=1.0, overlap=0.0) == pytest.approx(0.1)


def test_speedup_and_efficiency_are_against_one_rank():
    rows = predict(profile(), ring(), LINK, [1, 2, 4], placement=Placement(1, 1, 1), overlap=0.0)
    comm4 = 2 * 3 / 4 * 0.1 + 6e-5
    assert rows[0].step_s == pytest.approx(0.1)
    assert rows[2].step_s == pytest.approx(0.1 + comm4)
    assert rows[2].samples_s == pytest.approx(4 * 8 / (0.1 + comm4))
    assert rows[2].speedup == pytest.approx(rows[2].samples_s / rows[0].samples_s)
    assert rows[2].efficiency == pytest.approx(rows[2].speedup / 4)
    # 2 ranks: 100 MB at 1 GB/s take as long as the compute, so two ranks barely beat one
    assert rows[1].speedup == pytest.approx(2 * 0.1 / (0.1 + 0.1 + 2e-5))


def test_parameter_server_saturates_its_link():
    config = ServerConfig(server="shared")
    traffic = lambda n: ParameterServer.traffic(config, grad_bytes=10 * MB, model_bytes=10 * MB, world_size=n,  # noqa: E731
                                                steps_per_epoch=10)
    assert traffic(8) == Traffic("server", 10 * MB, 8, overlap=0.0)
    assert server_exchange_s(10 * MB, 8, LINK) == pytest.approx(2 * 7 * 0.01 + 2e-5)
    rows = predict(profile(grad_bytes=10 * MB), traffic, LINK, [1, 64, 256, 1024], placement=Placement(1, 1, 1),
                   overlap=0.75)
    # the server's link carries (N-1) S each way: throughput tends to batch / (2 S/B) = 8 / 0.02 = 400 samples/s
    assert rows[-1].samples_s == pytest.approx(1024 * 8 / (0.1 + 2 * 1023 * 0.01 + 2e-5))
    assert rows[-1].samples_s < 400 < rows[-1].samples_s * 1.01
    assert rows[-1].efficiency < 0.05
    dedicated = ParameterServer.traffic(ServerConfig(server="dedicated"), grad_bytes=1, model_bytes=1, world_size=8,
                                        steps_per_epoch=1)
    assert dedicated.workers == 7  # the server computes no gradient


def test_federated_rounds_are_amortised_over_their_steps():
    config = FedAvgConfig(local_epochs=3)
    traffic = lambda n: FedAvg.traffic(config, grad_bytes=1, model_bytes=100 * MB, world_size=n,  # noqa: E731
                                       steps_per_epoch=800 // n // 8)
    assert traffic(4) == Traffic("ring", 100 * MB, 4, every_steps=3 * 25, overlap=0.0)
    rows = predict(profile(), traffic, LINK, [1, 4], placement=Placement(1, 1, 1), overlap=0.75)
    per_step = (2 * 3 / 4 * 0.1 + 6e-5) / 75
    assert rows[1].exposed_s == pytest.approx(per_step)
    assert rows[1].step_s == pytest.approx(0.1 + per_step)
    # the same strategy all-reducing gradients every step would be far slower
    assert rows[1].samples_s > predict(profile(), ring(), LINK, [4], placement=Placement(1, 1, 1), overlap=0.0)[0].samples_s


def test_default_strategy_traffic_is_a_ring_allreduce_of_the_gradients():
    assert Strategy.traffic(StrategyConfig(), grad_bytes=5, model_bytes=9, world_size=6, steps_per_epoch=1) == \
        Traffic("ring", 5, 6)
    assert Strategy.traffic(None, grad_bytes=5, model_bytes=9, world_size=3, steps_per_epoch=1).workers == 3


def test_data_path_shared_by_every_rank_and_hidden_by_loader_workers():
    nfs = DataPath("nfs", 1e9)
    assert nfs.read_s(18, 2, 10 * MB) == pytest.approx(0.18)
    assert DataPath("disk", 1e9).read_s(18, 2, 10 * MB) == pytest.approx(0.02)  # a node's two ranks share a disk
    serial = predict(profile(data=0.01, sample_bytes=MB), ring(1), LINK, [1, 16], placement=Placement(1, 1, 1),
                     data_path=nfs, overlap=0.0)
    assert serial[1].data_s == pytest.approx(0.01 + 16 * 8 * MB / 1e9)
    assert serial[1].step_s == pytest.approx(serial[1].data_s + 0.1 + serial[1].exposed_s)
    read_ahead = dict(traffic=ring(1), link=LINK, world_sizes=[1], placement=Placement(1, 1, 1), overlap=0.0)
    two_workers = predict(profile(data=0.01, workers=2, sample_bytes=MB), data_path=nfs, **read_ahead)
    assert two_workers[0].step_s == pytest.approx(0.01 + 0.1)  # the read hidden within the loader's capacity; the
    # wait the profile measured stays
    slow = predict(profile(workers=2, sample_bytes=100 * MB), data_path=DataPath("nfs", 1e9), **read_ahead)
    assert slow[0].step_s == pytest.approx(0.8 / 2)  # beyond it, the loader sets the pace


def test_threads_per_rank_follow_the_ranks_on_a_node():
    node = Placement(ranks_per_node=2, cores=2, cpus_per_task=1)
    assert [node.threads(n) for n in (1, 2, 64)] == [2, 1, 1]
    assert Placement(ranks_per_node=2, cores=2, cpus_per_task=4).threads(2) == 4
    by_threads = Profile(4, {1: 0.03, 2: 0.02}, {1: 0.02, 2: 0.01}, {1: 0.0, 2: 0.0}, 4, 4, 4, 0)
    rows = predict(by_threads, ring(0), LINK, [1, 2], placement=node, overlap=0.0)
    assert [r.compute_s for r in rows] == [0.02, 0.03]


def test_measured_node_exchange_enters_the_prediction_for_ranks_on_one_node():
    """The wait in the job's strategy's exchange measured among the copies profiled together on this node,
    while they train, is the step's wait at that rank count where it exceeds the link model's; it does not
    carry over to ranks on other nodes."""
    measured = Profile(4, {1: 0.03, 2: 0.02}, {1: 0.02, 2: 0.01}, {1: 0.0, 2: 0.0}, 100 * MB, 100 * MB, 4, 0,
                       exchange_s={1: 0.5})
    full = predict(measured, ring(), LINK, [1, 2, 4], placement=Placement(2, 2, 1), overlap=0.9)
    assert full[0].exposed_s == 0 and full[1].exposed_s == full[1].comm_s == 0.5
    assert full[1].step_s == pytest.approx(0.03 + 0.5)
    link_only = exposed_s(ring_allreduce_s(100 * MB, 4, LINK), 0.02, 0.9)
    assert full[2].exposed_s == pytest.approx(link_only)  # 4 ranks span two nodes: the link model
    slow_link = Link(1e-3, 1 * MB)  # a link model slower than the measurement wins
    assert predict(measured, ring(), slow_link, [2], placement=Placement(2, 2, 1), overlap=0.0)[0].exposed_s > 1


@pytest.mark.ranks
def test_profile_times_the_training_loops_steps_on_the_jobs_ranks(tiny_job):
    """The profile is a short run of the job on its ranks, started by mpirun as run & manage starts them: each
    rank times the training loop's own steps through the job's strategy (DDP over gloo), its monitor included;
    their time blocked in the allreduce is the exchange, apart from the compute."""
    from autocnnp.run.job import load_job

    profile = scale_command.profile_job(load_job(tiny_job), {1: 2}, steps=4)
    assert set(profile.compute_s) == set(profile.backward_s) == set(profile.data_s) == set(profile.exchange_s) == {1}
    assert min(profile.compute_s[1], profile.backward_s[1], profile.data_s[1], profile.exchange_s[1]) > 0
    assert profile.batch == 2 and profile.train_samples == 8 and profile.grad_bytes > 0
    assert profile.sample_bytes == 16 * 16 * (4 * 4 + 8)  # as stored: four float32 channels and an int64 label


def test_powers_of_two_up_to_the_top():
    assert powers_of_two(1024) == [1 << i for i in range(11)]
    assert powers_of_two(18) == [1, 2, 4, 8, 16, 18]


def test_presets_parameter_counts_match_the_architectures():
    torch = pytest.importorskip("torch")
    from autocnnp.components.architectures.fcn import FCN
    from autocnnp.components.architectures.unet import UNet

    with torch.device("meta"):
        unet = UNet(1, 2, depth=5, base_channels=64, norm="none")
        fcn = FCN(1, 2, width=1.0, norm="none")
    assert sum(p.numel() for p in unet.parameters()) == scale_command.UNET_PARAMS
    fc6_fc7 = (7 * 7 * 512 * 4096 + 4096) + (4096 * 4096 + 4096)
    assert sum(p.numel() for p in fcn.parameters()) + fc6_fc7 == scale_command.FCN_PARAMS
    assert 130e6 < scale_command.FCN_PARAMS < 140e6  # Long et al.'s FCN-8s: 134 M


def test_r2d2_preset_at_18_gpus(capsys, tmp_path):
    out = tmp_path / "r2d2.json"
    assert main(["scale", "--preset", "r2d2-unet", "--ranks", "1,18", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    one, eighteen = report["rows"]
    # 21 h 40 min over 100 epochs of 33,880 slices, minibatch 7: the one-GPU step
    assert one["step_s"] == pytest.approx(78_000 / (100 * 33_880 / 7))
    assert eighteen["world_size"] == 18 and 0.85 < eighteen["efficiency"] < 1.0
    assert eighteen["speedup"] == pytest.approx(18 * eighteen["efficiency"])
    assert "R2D2 U-Net" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.ranks
def test_command_on_a_tiny_job(capsys, tmp_path, tiny_job):
    plot, out = tmp_path / "scale.png", tmp_path / "scale.json"
    assert main(["scale", str(tiny_job), "--link", "10gbe", "--max-ranks", "64", "--ranks-per-node", "1",
                 "--steps", "1", "--plot", str(plot), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["ranks", "threads"])
    assert [line.split()[0] for line in lines[header + 1:header + 8]] == ["1", "2", "4", "8", "16", "32", "64"]
    assert plot.stat().st_size > 1000 and plot.read_bytes()[:4] == b"\x89PNG"
    report = json.loads(out.read_text())
    assert report["link"]["name"] == "10gbe"
    assert [r["world_size"] for r in report["rows"]] == [1, 2, 4, 8, 16, 32, 64]
    assert report["profile"]["grad_bytes"] > 0 and report["profile"]["batch"] == 2
    assert all(r["comm_s"] > 0 for r in report["rows"][1:])
    assert report["rows"][-1]["efficiency"] < report["rows"][1]["efficiency"]


def test_json_to_standard_output_is_the_json_alone(tmp_path):
    plot = tmp_path / "scale.png"
    done = subprocess.run([sys.executable, "-m", "autocnnp", "scale", "--preset", "r2d2-unet", "--ranks", "1,18",
                           "--plot", str(plot), "--json", "-"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [row["world_size"] for row in json.loads(done.stdout)["rows"]] == [1, 18]  # nothing else on stdout
    assert "R2D2 U-Net" in done.stderr and f"wrote {plot}" in done.stderr  # the table goes to standard error


def test_compute_override_replaces_the_profile(tmp_path):
    out = tmp_path / "scale.json"
    assert main(["scale", "--preset", "r2d2-unet", "--ranks", "1,4", "--compute-ms", "250", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["profile"]["compute_s"] == {"1": 0.25}
    assert report["profile"]["backward_s"]["1"] == pytest.approx(0.25 * 2 / 3)  # keeps the backward's share
    assert report["rows"][0]["step_s"] == pytest.approx(0.25)


@pytest.mark.parametrize("argv, word", [(["--preset", "r2d2-fccn"], "did you mean 'r2d2-fcn'"),
                                         (["--preset", "r2d2-unet", "--link", "carrier-pigeon"], "unknown link"),
                                         (["--preset", "r2d2-unet", "--data-path", "nfs:fast"], "not a data path"),
                                         ([], "give a job file or --preset")])
def test_bad_options_give_one_paragraph_and_exit_code_2(capsys, argv, word):
    assert main(["scale", *argv]) == 2
    err = capsys.readouterr().err
    assert word in err and err.count("\n") == 1 and err.startswith("autocnnp: ")


@pytest.fixture
def tiny_job(tmp_path):
    job = tmp_path / "tiny.xml"
    job.write_text("""<system_config><task name="imaging_segmentation">
  <parallelism-degree>2</parallelism-degree>
  <CNN_archi name="unet"><param name="depth">2</param><param name="base_channels">4</param></CNN_archi>
  <data format="synthetic"><param name="train_samples">8</param><param name="valid_samples">2</param>
    <param name="size">16</param></data>
  <hyperparameters><property name="minibatch_size">2</property><property name="end_epoch">1</property></hyperparameters>
</task></system_config>""")
    return job
