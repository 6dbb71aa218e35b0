"""3D predict: a checkpoint of a 3D network describes its patch, spacing and windows; predict resamples each volume
to the training spacing, runs it through a sliding window and writes labels (and probabilities) on the source's own
grid, affine and qform/sform codes."""

from __future__ import annotations

import json
import types

import nibabel as nib
import numpy as np
import pytest
import torch
from jobfiles import QUIET, write_job

from autocnnp.data.resample import preprocess_volume, to_source
from autocnnp.data.synth import write_synthetic_dataset
from autocnnp.generator.assemble import assemble
from autocnnp.training.loop import model_card
from autocnnp.training.sliding_window import SlidingWindow

ARCH3D = ('<CNN_archi name="unet3d"><param name="depth">2</param><param name="base_channels">4</param>'
          '</CNN_archi>')
PATCH = (8, 16, 16)
DATA3D = ('<data format="decathlon"><train><path>data</path></train><test><path>data</path></test>'
          '<param name="dimension">3d</param><param name="patch_size">8,16,16</param>'
          '<param name="spacing">1.0,1.0,2.0</param><param name="valid_overlap">0.5</param></data>')


def oblique_affine() -> np.ndarray:
    """Anisotropic voxels (0.8 x 1.1 x 2.5 mm) in a frame turned 30 degrees about z and 10 about x, shifted."""
    a, b = np.radians(30), np.radians(10)
    turn_z = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    turn_x = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = turn_z @ turn_x @ np.diag([0.8, 1.1, 2.5])
    affine[:3, 3] = (-12.5, 40.0, 7.25)
    return affine


@pytest.fixture(scope="module")
def checkpoint3d(tmp_path_factory):
    """Tubes (two training cases, one test case on an oblique grid with distinct qform and sform codes) and the
    checkpoint of an untrained 3D U-Net with its model card."""
    root = tmp_path_factory.mktemp("predict3d")
    write_synthetic_dataset(root / "data", "tubes", cases=2, shape=(30, 26, 11), seed=3, test_cases=1,
                            affine=oblique_affine())
    test = root / "data" / "imagesTs" / "case_002.nii.gz"
    img = nib.load(test)
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=2)
    nib.save(img, test)
    gen = assemble(write_job(root / "job.xml", arch=ARCH3D, data=DATA3D, extra=QUIET))
    torch.manual_seed(0)
    net = gen.action("architecture_injection").build(in_channels=1, num_classes=3)
    data = types.SimpleNamespace(in_channels=1, num_classes=3, class_names=("background", "sphere", "tube"))
    torch.save({"model": net.state_dict(), "model_card": model_card(gen, data)}, root / "net3d.pt")
    return root, net.eval()


def test_the_card_of_a_3d_model_says_everything_predict_needs(checkpoint3d):
    root, _ = checkpoint3d
    card = torch.load(root / "net3d.pt", weights_only=False)["model_card"]
    assert card["dimension"] == "3d"
    assert {k: card["input"][k] for k in ("dimension", "patch_size", "spacing", "overlap")} == \
        {"dimension": "3d", "patch_size": list(PATCH), "spacing": [1.0, 1.0, 2.0], "overlap": 0.5}
    json.dumps(card)  # plain values: the zoo stores it as JSON


def test_3d_predict_writes_the_source_grid_affine_and_codes(checkpoint3d, cli, tmp_path):
    root, net = checkpoint3d
    rc, text, err = cli("predict", "--checkpoint", root / "net3d.pt", "--input", root / "data", "--out", tmp_path,
                        "--probabilities", "--threads", "1", "--channels-last")  # a GPU's default: channels_last_3d
    assert rc == 0, err
    assert "sliding windows of 8x16x16 overlapping by 0.5" in text and "case_002: " in text and "windows" in text
    source = nib.load(root / "data" / "imagesTs" / "case_002.nii.gz")
    labels = nib.load(tmp_path / "case_002.nii.gz")
    assert labels.shape == source.shape == (30, 26, 11)
    np.testing.assert_array_equal(labels.affine, source.affine)
    assert (int(labels.header["qform_code"]), int(labels.header["sform_code"])) == (1, 2)
    np.testing.assert_allclose(labels.header.get_qform(), source.header.get_qform(), atol=1e-6)
    # the same as the pipeline by hand: resample to 1 x 1 x 2 mm, windows, back to the source grid, argmax
    image = np.asarray(source.dataobj)
    volume = preprocess_volume(image, source.header.get_zooms()[:3], (1.0, 1.0, 2.0), None, True)
    probs = SlidingWindow(PATCH, 0.5).probabilities(net, torch.from_numpy(volume)[None])[0]
    np.testing.assert_array_equal(np.asarray(labels.dataobj), to_source(probs, image.shape, labels=True))
    kept = [nib.load(p) for p in sorted(tmp_path.glob("case_002_prob-*.nii.gz"))]
    assert len(kept) == 3 and all(k.shape == source.shape for k in kept)
    np.testing.assert_allclose(sum(np.asarray(k.dataobj) for k in kept), 1.0, atol=1e-5)


# --- a 2D checkpoint given to a 3D job, and the reverse: one line ------------------------------------------

def _refused(cli, *argv) -> str:
    rc, out, err = cli(*argv)
    assert rc == 2 and err.startswith("autocnnp: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _job3d(folder, data, **kw):
    return write_job(folder / "job3d.xml", degree=1, arch=ARCH3D, data=DATA3D.replace(">data<", f">{data}<"),
                     extra=QUIET, **kw)


@pytest.mark.parametrize("trained", ["2d", "3d"])
def test_a_pretrained_checkpoint_of_the_other_dimension_is_refused_before_the_ranks(
        checkpoint3d, cli, tmp_path, nothing_starts, trained):
    root, _ = checkpoint3d
    card = {"framework": "torch", **({"dimension": "3d"} if trained == "3d" else {})}  # 2D cards predate the key
    torch.save({"model": {"w": torch.zeros(2)}, "model_card": card}, tmp_path / "weights.pt")
    job = _job3d(tmp_path, root / "data") if trained == "2d" else write_job(tmp_path / "job2d.xml", degree=1,
                                                                           extra=QUIET)
    job.write_text(job.read_text().replace("<CNN_archi ", "<CNN_archi pretrained=\"weights.pt\" "))
    err = _refused(cli, "run", job)
    wanted = "3D" if trained == "2d" else "2D"
    assert (f"the pretrained checkpoint {tmp_path / 'weights.pt'} holds a {trained.upper()} model, but the job trains "
            f"a {wanted} one. Hint: start from a checkpoint of a {wanted} run") in err


def test_resuming_a_2d_checkpoint_with_a_3d_job_is_refused_before_the_ranks(checkpoint3d, cli, tmp_path,
                                                                             nothing_starts):
    from autocnnp.components.checkpoints.periodic import Config, Periodic

    root, _ = checkpoint3d
    job = _job3d(tmp_path, root / "data")
    Periodic(Config(), directory=tmp_path / "out" / "checkpoints", rank=0).save(
        {"model": {"w": torch.zeros(2)}, "optimizer_type": "SGD", "epoch": 1, "model_card": {"framework": "torch"}}, 0)
    err = _refused(cli, "run", job)
    assert (f"the run folder {tmp_path / 'out'} holds a checkpoint of a 2D model (ckpt-epoch0001.pt) to resume from, "
            "but the job trains a 3D one. Hint: resume with the 2d job it was trained with") in err


def test_predict_with_a_2d_job_says_the_3d_checkpoint_wins_in_one_line(checkpoint3d, cli, tmp_path):
    root, _ = checkpoint3d
    job = write_job(tmp_path / "job2d.xml", degree=1, extra=QUIET)
    rc, text, err = cli("predict", job, "--checkpoint", root / "net3d.pt", "--input",
                        root / "data" / "imagesTs" / "case_002.nii.gz", "--out", tmp_path / "pred", "--threads", "1")
    assert rc == 0, err
    assert err == ("autocnnp: warning: the job says dimension 2d: a 2D model (trained: a 3D unet3d model); using what "
                   "the checkpoint was trained with\n")
    assert nib.load(tmp_path / "pred" / "case_002.nii.gz").shape == (30, 26, 11)


def test_dimension_3d_on_tensorflow_is_refused_at_validate_naming_the_setting(checkpoint3d, cli, tmp_path):
    root, _ = checkpoint3d
    job = _job3d(tmp_path, root / "data")
    framework = '<action class="non_extensible" type="framework"><value>tensorflow</value></action>'
    job.write_text(job.read_text().replace('<module name="train_env_def">', '<module name="train_env_def">' + framework)
                   .replace('name="unet3d"', 'name="unet"'))
    err = _refused(cli, "validate", job)
    line = next(i for i, t in enumerate(job.read_text().splitlines(), 1) if 'name="dimension"' in t)
    assert err.startswith(f"autocnnp: {job}:{line}:") and "dimension=3d trains on the torch framework only; this job " \
        "trains with tensorflow. Hint: remove the framework action (torch), or train 2D slices" in err


@pytest.mark.ranks
def test_predict_on_two_ranks_writes_each_case_once_as_one_rank_does(checkpoint3d, cli, tmp_path):
    import subprocess
    import sys

    root, _ = checkpoint3d
    common = ["--checkpoint", root / "net3d.pt", "--input", root / "data", "--split", "all", "--threads", "1"]
    assert cli("predict", *common, "--out", tmp_path / "one")[0] == 0
    done = subprocess.run([sys.executable, "-m", "autocnnp", "predict", *map(str, common), "--out",
                           str(tmp_path / "two"), "--ranks", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "predicting 3 volume(s) on 2 ranks (mpirun)" in text
    assert "(rank 0 of 2: 2 of 3)" in text and "(rank 1 of 2: 1 of 3)" in text
    for case in ("case_000", "case_001", "case_002"):
        assert text.count(f"  {case}: ") == 1  # written by one rank
        one, two = (nib.load(tmp_path / run / f"{case}.nii.gz") for run in ("one", "two"))
        np.testing.assert_array_equal(np.asarray(one.dataobj), np.asarray(two.dataobj))
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [f"case_00{i}.nii.gz" for i in range(3)]


def test_channels_last_of_a_3d_network_and_batch_is_channels_last_3d():
    from autocnnp.data.batches import channels_last, channels_last_network

    net = channels_last_network(torch.nn.Conv3d(2, 3, 3))
    assert net.weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert channels_last(5) is torch.channels_last_3d and channels_last(4) is torch.channels_last


def test_more_ranks_than_volumes_leave_the_idle_ranks_silent(checkpoint3d, cli, tmp_path, monkeypatch):
    root, _ = checkpoint3d
    common = ("--checkpoint", root / "net3d.pt", "--input", root / "data" / "imagesTs" / "case_002.nii.gz",
              "--threads", "1")
    rc, text, err = cli("predict", *common, "--out", tmp_path / "front", "--ranks", "3")
    assert rc == 0, err
    assert text.startswith("--ranks 3 but 1 volume(s): 1 rank(s), one a volume\npredicting 1 volume(s) with ")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "3")  # as srun -n 3 or mpirun -np 3 start it
    for rank, says in (("1", ""), ("0", "(rank 0 of 3: 1 of 1; 2 rank(s) without a volume)")):
        monkeypatch.setenv("OMPI_COMM_WORLD_RANK", rank)
        rc, text, err = cli("predict", *common, "--out", tmp_path / "rank")
        assert rc == 0 and (says in text if says else text == ""), err
