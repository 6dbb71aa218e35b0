"""The model zoo: publish a trained run, list/show/pull it, fine-tune a job from `zoo:NAME` (its first epoch
beats training from scratch), freeze the encoder, and a new head for other classes."""

from __future__ import annotations

import csv
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from jobfiles import QUIET, TINY_UNET, synthetic_data, write_job

from autocnnp.components.architectures.unet import UNet
from autocnnp.training.pretrained import load_pretrained

pytest.importorskip("mlflow", reason="mlflow is pinned in requirements/test.txt (make venv)")

HYPER = dict(minibatch_size=4, lr=0.05, optimiser="sgd")


def autocnnp(*args, env=None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autocnnp", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def job(folder: Path, name: str, seed: int, epochs: int, arch: str = TINY_UNET) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = write_job(folder / f"{name}.xml", output=f"runs/{name}", arch=arch, data=synthetic_data(32, 8, "atrium"),
                     hyper={**HYPER, "end_epoch": epochs}, extra=QUIET).read_text()
    (folder / f"{name}.xml").write_text(text.replace("<seed>0</seed>", f"<seed>{seed}</seed>"))
    return folder / f"{name}.xml"


def first_loss(rundir: Path) -> float:
    with open(rundir / "metrics.csv") as f:
        return float(next(csv.DictReader(f))["train_loss"])


@pytest.mark.ranks
def test_publish_then_fine_tune_from_the_zoo(tmp_path):
    env = {"AUTOCNNP_ZOO": str(tmp_path / "zoo")}
    source = job(tmp_path, "source", seed=0, epochs=6)
    assert autocnnp("run", source, env=env).returncode == 0
    published = autocnnp("zoo", "publish", tmp_path / "runs" / "source", "--name", "atrium-unet", env=env)
    assert published.returncode == 0, published.stderr
    assert published.stdout.startswith("published zoo:atrium-unet/1")
    listed = autocnnp("zoo", "list", env=env)
    assert "atrium-unet: 1 version(s), latest 1 (unet, classes background, left atrium)" in listed.stdout
    shown = autocnnp("zoo", "show", "atrium-unet/1", env=env)
    assert "architecture: unet" in shown.stdout and "metric dice_fg:" in shown.stdout and "best: dice_fg=" in shown.stdout
    pulled = autocnnp("zoo", "pull", "atrium-unet", tmp_path / "pulled", env=env)
    assert pulled.returncode == 0 and {"checkpoint.pt", "model_card.json", "job.xml", "manifest.json"} <= \
        {p.name for p in (tmp_path / "pulled").iterdir()}

    scratch = job(tmp_path, "scratch", seed=3, epochs=1)
    tuned = job(tmp_path, "tuned", seed=3, epochs=1, arch=TINY_UNET.replace("<CNN_archi ", '<CNN_archi pretrained='
                                                                           '"zoo:atrium-unet" '))
    for j in (scratch, tuned):
        done = autocnnp("run", j, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
    assert "pretrained from zoo:atrium-unet/1" in done.stdout + done.stderr
    assert first_loss(tmp_path / "runs" / "tuned") < first_loss(tmp_path / "runs" / "scratch")
    print(f"first-epoch train loss: from the zoo {first_loss(tmp_path / 'runs' / 'tuned'):.4f}, "
          f"from scratch {first_loss(tmp_path / 'runs' / 'scratch'):.4f}")

    frozen = job(tmp_path, "frozen", seed=3, epochs=1, arch=TINY_UNET.replace(
        "<CNN_archi ", '<CNN_archi pretrained="zoo:atrium-unet/1" freeze="encoder" '))
    done = autocnnp("run", frozen, env=env)
    assert done.returncode == 0 and "encoder frozen" in done.stdout, done.stderr[-2000:]
    zoo = torch.load(tmp_path / "pulled" / "checkpoint.pt", weights_only=False)["model"]
    after = torch.load(tmp_path / "runs" / "frozen" / "checkpoints" / "ckpt-epoch0001.pt", weights_only=False)["model"]
    downs = [k for k in zoo if k.startswith("down.")]
    assert downs and all(torch.equal(zoo[k], after[k]) for k in downs)  # the encoder did not move
    assert not torch.equal(zoo["head.weight"], after["head.weight"])  # the rest trained


def test_a_new_head_for_other_classes(tmp_path):
    trained = UNet(1, 4, depth=2, base_channels=4, norm="none")
    torch.save({"model": trained.state_dict()}, tmp_path / "c.pt")
    fresh = UNet(1, 2, depth=2, base_channels=4, norm="none")
    text = load_pretrained(fresh, tmp_path / "c.pt", "none").summary
    assert "new: head.bias, head.weight" in text
    assert torch.equal(fresh.down[0][0].weight, trained.down[0][0].weight)
    with pytest.raises(Exception, match="no tensor of it fits"):
        load_pretrained(torch.nn.Linear(3, 3), tmp_path / "c.pt", "none")


def test_a_pretrained_source_is_checked_with_the_job(cli, tmp_path):
    bad = job(tmp_path, "bad", seed=0, epochs=1, arch=TINY_UNET.replace("<CNN_archi ", '<CNN_archi pretrained="zoo:x/y" '))
    rc, _, err = cli("validate", bad)
    assert rc == 2 and "'zoo:x/y' is not a zoo model" in err
    frozen = job(tmp_path, "f", seed=0, epochs=1, arch=TINY_UNET.replace("<CNN_archi ", '<CNN_archi freeze="all" '))
    rc, _, err = cli("validate", frozen)
    assert rc == 2 and "freeze 'all' is neither none nor encoder" in err
    missing = job(tmp_path, "m", seed=0, epochs=1, arch=TINY_UNET.replace("<CNN_archi ", '<CNN_archi pretrained="no.pt" '))
    rc, _, err = cli("validate", missing)
    assert rc == 2 and "no.pt does not exist" in err


def test_publishing_a_folder_that_does_not_exist_says_so(cli, tmp_path):
    rc, _, err = cli("zoo", "publish", tmp_path / "runs" / "nothere", "--name", "x", "--zoo", tmp_path / "zoo")
    assert rc == 2 and "nothere: the run folder does not exist" in err and "holds no checkpoint" not in err
    (tmp_path / "empty").mkdir()
    rc, _, err = cli("zoo", "publish", tmp_path / "empty", "--name", "x", "--zoo", tmp_path / "zoo")
    assert rc == 2 and "the run folder holds no checkpoint" in err


def test_show_lists_the_metrics_of_the_published_epoch(cli, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    card = {"architecture": {"name": "unet"}, "classes": {"0": "background", "1": "organ"}, "in_channels": 1,
            "job": {"text": "<system_config/>"}}
    model = UNet(1, 2, depth=2, base_channels=4, norm="none").state_dict()
    torch.save({"model": model, "epoch": 2, "model_card": card}, run / "checkpoints" / "ckpt-best.pt")
    torch.save({"model": model, "epoch": 3, "model_card": card}, run / "checkpoints" / "ckpt-epoch0003.pt")
    (run / "checkpoints" / "latest").write_text("ckpt-epoch0003.pt\n")
    (run / "checkpoints" / "best").write_text('{"file": "ckpt-best.pt", "metric": "dice_fg", "value": 0.9, "epoch": 2}')
    (run / "metrics.csv").write_text("epoch,dice_fg,valid_loss\n1,0.5,0.7\n2,0.9,0.3\n3,0.8,0.2\n")
    (run / "manifest.json").write_text('{"final_metrics": {"epoch": 3, "dice_fg": 0.8, "valid_loss": 0.2}}')
    rc, out, err = cli("zoo", "publish", run, "--name", "organ", "--zoo", tmp_path / "zoo")
    assert rc == 0, err
    rc, out, _ = cli("zoo", "show", "organ", "--zoo", tmp_path / "zoo")
    assert "best: dice_fg=0.9000 at epoch 2" in out and "epoch: 2" in out
    assert "metric dice_fg: 0.9000" in out and "metric valid_loss: 0.3000" in out  # epoch 2's, not the last's
    assert "zoo:organ/1: dice_fg 0.9000" in out


@pytest.mark.ranks
@pytest.mark.parametrize("sync_batchnorm", ["false", "true"])
def test_freeze_encoder_trains_what_is_new_and_keeps_the_statistics(tmp_path, sync_batchnorm):
    """A 4-channel model with batch norm starts a 1-channel job: the new first layer trains, the rest of the
    encoder (weights and BatchNorm running statistics) stays as loaded, through training and validation, also
    when the strategy replaces the norm layers (sync_batchnorm)."""
    torch.manual_seed(0)
    source = UNet(4, 2, depth=2, base_channels=4, norm="batch")
    for module in source.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    torch.save({"model": source.state_dict()}, tmp_path / "four.pt")
    arch = TINY_UNET.replace("none", "batch").replace("<CNN_archi ", '<CNN_archi pretrained="four.pt" freeze="encoder" ')
    path = job(tmp_path, "frozen", seed=1, epochs=2, arch=arch)
    done = autocnnp("run", path, "--set", f"dist_strategy.sync_batchnorm={sync_batchnorm}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "new: down.0.0.weight" in done.stdout and "newly initialised parameters in it train" in done.stdout
    first, after = (torch.load(tmp_path / "runs" / "frozen" / "checkpoints" / f"ckpt-epoch000{n}.pt",
                               weights_only=False)["model"] for n in (1, 2))
    loaded = {k: v for k, v in source.state_dict().items() if k.startswith("down.") and k != "down.0.0.weight"}
    assert any("running_mean" in k for k in loaded)
    moved = [k for k, v in loaded.items() if not torch.equal(v, after[k])]
    assert not moved, f"frozen tensors changed: {moved}"
    assert after["down.0.0.weight"].shape[1] == 1 and not torch.equal(first["down.0.0.weight"],
                                                                       after["down.0.0.weight"])  # the new layer trains


def docs_path() -> list[str]:
    """The command lines of the docs' path from volumes to a zoo model's predictions (how-to: tracking and zoo,
    its Model zoo section)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "howto" / "tracking-zoo.rst").read_text()
    section = text[text.index("Model zoo and transfer learning"):]
    block = section[section.index(".. code-block:: sh"):].split("\n\n")[1]
    return [line.strip() for line in block.splitlines() if line.strip()]


@pytest.mark.ranks
def test_the_docs_path_from_volumes_to_zoo_predictions_runs_as_written(tmp_path):
    shutil.copytree(Path(__file__).resolve().parents[1] / "xml_configs", tmp_path / "xml_configs",
                    ignore=shutil.ignore_patterns("runs", "data"))
    env = {k: v for k, v in os.environ.items() if k != "AUTOCNNP_ZOO"}
    env["HOME"] = str(tmp_path / "home")  # the default zoo (~/.autocnnp/zoo) and its cache, here
    lines = docs_path()
    assert [shlex.split(line)[:2] for line in lines] == [[".venv/bin/autocnnp", verb] for verb in
                                                         ("synth", "run", "zoo", "predict", "evaluate")]
    for line in lines:
        argv = [sys.executable, "-m", "autocnnp", *shlex.split(line)[1:]]
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{line}\n{done.stderr[-2000:]}"
    assert (tmp_path / "predictions" / "case_006.nii.gz").is_file()
    with open(tmp_path / "predictions" / "metrics.csv") as f:
        case = next(row for row in csv.DictReader(f) if row["case"] == "case_006")
    assert float(case["dice_fg"]) > 0.3, case  # it learned something


def test_predict_refuses_a_model_without_volumes_saying_what_to_predict_on(cli, tmp_path):
    torch.save({"model": {}, "model_card": {"input": None}}, tmp_path / "synthetic.pt")
    rc, _, err = cli("predict", "--checkpoint", tmp_path / "synthetic.pt", "--input", tmp_path, "--out",
                     tmp_path / "pred")
    assert rc == 2 and "trained on data without volumes" in err and "metrics.csv" in err
    assert "`autocnnp synth DIR`" in err and "then predict on DIR" in err
