"""A filesystem that refuses writes (full, over quota, read-only), on a real small tmpfs: every writer of a run
says which file and how much space is left, on one line, leaves its previous file whole; run & manage ends
the job with exit 1, and pre-flight refuses (exit 2) a run that clearly cannot fit, leaving nothing behind.

Mounting needs root (CI and the dev container have it); elsewhere these tests are skipped."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from jobfiles import QUIET, TINY_UNET, checkpoint_plugin, strategy_module, synthetic_data, write_job

from autocnnp.core.errors import ExitCode
from autocnnp.core.files import WriteRefused, append_text, atomic_write
from autocnnp.core.rundir import RunDir
from autocnnp.data import preprocess

MiB = 1 << 20


@pytest.fixture
def small_disk(tmp_path):
    """``small_disk(mib)``: a folder on a tmpfs of that size, unmounted after the test."""
    mounted: list[Path] = []

    def mount(mib: int) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(where)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'not root'})")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(folder: Path) -> None:
    """Take every free byte of ``folder``'s filesystem."""
    with open(folder / "filler", "wb", buffering=0) as f:
        chunk = b"\0" * 65536
        while True:
            try:
                f.write(chunk)
            except OSError:
                chunk = chunk[:len(chunk) // 2]
                if not chunk:
                    return


def refusal(path: Path, disk: Path, reason: str = "No space left on device") -> re.Pattern:
    """The one line a refused write of ``path`` on the tmpfs ``disk`` reads as."""
    return re.compile(rf"cannot write {re.escape(str(path))}: {reason} \(\d+(\.\d)? (bytes|KiB|MiB) free of \d\.0 MiB on "
                      rf"{re.escape(str(disk))}\)")


def plots_of(folder: Path) -> Path:
    """A run folder whose metrics make plots (plot_run's input)."""
    (folder / "metrics.csv").write_text("epoch,train_loss,valid_loss,dice_fg\n1,0.9,0.8,0.1\n2,0.5,0.4,0.6\n")
    return folder / "plots" / "learning_curves.png"


WRITERS = {
    # a checkpoint: torch.save replaces the ENOSPC of its writes with a RuntimeError of its own
    "checkpoint": (lambda d: d / "ckpt.pt", lambda p: atomic_write(p, lambda f: torch.save(torch.zeros(MiB), f))),
    "metrics row": (lambda d: d / "metrics.csv", lambda p: append_text(p, "3," + "0.5," * 100_000 + "\n")),
    "plot": (plots_of, lambda p: __import__("autocnnp.training.monitor", fromlist=["plot_run"]).plot_run(
        RunDir(p.parent.parent))),
    "journal": (lambda d: d / "tracking" / "journal.jsonl",
                lambda p: __import__("autocnnp.components.trackers.mlflow_tracking", fromlist=["Journal"]).Journal(
                    p).add("metrics", values={"x": 1.0}, pad="x" * MiB)),
    "slice cache": (lambda d: d / "images.npy", lambda p: preprocess._arrays(p.parent, {p.name: ((MiB,), np.float32)})),
}


@pytest.mark.parametrize("writer", WRITERS)
def test_a_write_on_a_full_filesystem_names_the_file_and_the_free_space(small_disk, writer):
    disk = small_disk(2)
    target, write = WRITERS[writer]
    path = target(disk)
    path.parent.mkdir(parents=True, exist_ok=True)
    before = b"epoch,loss\n1,0.5\n"
    if writer in ("checkpoint", "metrics row", "journal"):
        path.write_bytes(before)  # what a refused write must leave whole
    fill(disk)
    with pytest.raises(WriteRefused) as caught:
        write(path)
    assert refusal(path, disk).fullmatch(str(caught.value)), str(caught.value)
    if writer in ("checkpoint", "metrics row", "journal"):
        assert path.read_bytes() == before
    assert not [p for p in disk.rglob("*") if p.name.endswith(".tmp")]


def test_a_read_only_filesystem_is_named_so(small_disk):
    disk = small_disk(1)
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    with pytest.raises(WriteRefused) as caught:
        atomic_write(disk / "checkpoints" / "latest", "ckpt-epoch0001.pt\n")
    assert refusal(disk / "checkpoints" / "latest", disk, "Read-only file system").fullmatch(str(caught.value))


def test_preflight_refuses_a_run_whose_checkpoints_cannot_fit(cli, small_disk, nothing_starts):
    disk = small_disk(3)
    job = write_job(disk / "job.xml", output="out", data=synthetic_data(16, 4), extra=QUIET)  # the demo U-Net
    rc, _, err = cli("run", job)
    assert rc == ExitCode.BAD_INPUT and err.count("\n") == 1, err
    assert re.search(rf"the run will write at least \d\.\d MiB in {disk / 'out'} \(4 checkpoints of \d\.\d MiB at once\), "
                     rf"more than the 3\.0 MiB free of 3\.0 MiB on {disk}\. Hint: free space there", err), err
    assert sorted(p.name for p in disk.iterdir()) == ["job.xml"]  # nothing left behind
    rc, _, err = cli("run", job, "--set", "checkpoint.keep=1")
    assert rc == 2 and "(3 checkpoints of" in err and "more than the 3.0 MiB free" in err


def test_preflight_refuses_a_data_cache_that_cannot_fit(cli, small_disk, nothing_starts):
    from autocnnp.data.synth import write_synthetic_dataset

    data = write_synthetic_dataset(small_disk(64) / "data", "atrium", cases=4, shape=(96, 96, 40), seed=1)
    disk = small_disk(2)
    job = write_job(disk / "job.xml", output="out", arch=TINY_UNET, extra=QUIET, hyper=dict(minibatch_size=2),
                    data=f'<data format="decathlon"><train><path>{data}</path></train><param name="size">128</param>'
                         '<param name="slices_per_volume">0</param></data>')
    rc, _, err = cli("run", job)
    assert rc == ExitCode.BAD_INPUT and err.count("\n") == 1, err
    assert "the data cache does not fit: cannot write " in err and f"free of 2.0 MiB on {disk})" in err, err
    assert sorted(p.name for p in disk.iterdir()) == ["job.xml"]


FILLS_THE_DISK = '''from pathlib import Path


def FillTheDisk(epoch, metrics, state):
    """Another program takes every free byte of the run's filesystem after the second epoch (once)."""
    filler = Path(__file__).with_name("filler")
    if epoch == 1 and not filler.exists():
        with open(filler, "wb", buffering=0) as f:
            chunk = bytes(65536)
            while chunk:
                try:
                    f.write(chunk)
                except OSError:
                    chunk = chunk[:len(chunk) // 2]
'''


@pytest.mark.ranks
def test_a_disk_that_fills_during_the_run_ends_it_with_one_line(small_disk):
    disk = small_disk(8)
    (disk / "fill.py").write_text(FILLS_THE_DISK)
    actions = strategy_module(extra=checkpoint_plugin("FillTheDisk", "fill.py"))
    job = write_job(disk / "job.xml", output="out", arch=TINY_UNET, data=synthetic_data(16, 4, size=16), actions=actions,
                    hyper=dict(minibatch_size=2, end_epoch=5, lr=0.05, optimiser="sgd"),
                    extra=QUIET + '<cluster><property name="stop_grace_s">5</property></cluster>')
    run = subprocess.run([sys.executable, "-m", "autocnnp", "run", str(job)], capture_output=True, text=True, timeout=300)
    out = disk / "out"
    assert run.returncode == ExitCode.FAILED, run.stderr
    line = run.stderr.removeprefix("autocnnp: the job failed: rank 0 failed: ")
    assert run.stderr.count("\n") == 1 and line != run.stderr, run.stderr
    assert re.fullmatch(rf"cannot write {re.escape(str(out))}/\S+: No space left on device \(\d+ (bytes|KiB) free of "
                        rf"8\.0 MiB on {re.escape(str(disk))}\)\n", line), run.stderr
    with open(out / "metrics.csv", newline="") as f:  # whole rows only
        assert [row["epoch"] for row in csv.DictReader(f)] in (["1", "2"], ["1", "2", "3"])
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert torch.load(out / "checkpoints" / latest, weights_only=False)["epoch"] >= 1
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    (disk / "filler").write_bytes(b"")  # room again: the same command resumes
    again = subprocess.run([sys.executable, "-m", "autocnnp", "run", str(job)], capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    with open(out / "metrics.csv", newline="") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["1", "2", "3", "4", "5"]
