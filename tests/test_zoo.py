"""The model zoo: publish a trained run, list/show/pull it, fine-tune a job from `zoo:NAME` (its first epoch
beats training from scratch), freeze the encoder, and a new head for other classes."""

from __future__ import annotations

import csv
import os
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
    text = load_pretrained(fresh, tmp_path / "c.pt", "none")
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
