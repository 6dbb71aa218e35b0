"""End to end on volumes nobody tuned for: a generated Decathlon dataset with an oblique affine, an odd shape
and held-out labels; train on 2 ranks, predict (source shape, affine and header codes kept), evaluate.

The threshold: a network that predicts background only scores a foreground Dice of 0; this one, 20 epochs
on 4 training volumes, scored 0.92 on the two held-out volumes when the test was written. 0.6 leaves room
for another machine's arithmetic while failing any run that did not learn the structure.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from jobfiles import QUIET, write_job

from autocnnp.data.synth import write_synthetic_dataset

SHAPE = (37, 29, 13)
HELD_OUT_DICE = 0.6
ROOT = Path(__file__).resolve().parents[1]


def oblique_affine() -> np.ndarray:
    """20 degrees about z, anisotropic 0.9 x 1.1 x 2.5 mm voxels, an offset."""
    t = np.deg2rad(20)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]]) @ np.diag([0.9, 1.1, 2.5])
    affine[:3, 3] = [-12, 7, 30]
    return affine


DATA = ('<data format="decathlon"><train><path>data</path></train><test><path>data</path></test>'
        '<param name="slices_per_volume">8</param><param name="size">32</param></data>')
ARCH = '<CNN_archi name="unet"><param name="depth">2</param><param name="base_channels">8</param></CNN_archi>'
HYPER = dict(lr=0.01, optimiser="adam", loss="dice_ce", minibatch_size=4, end_epoch=20)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("volumes")
    write_synthetic_dataset(root / "data", "atrium", cases=6, shape=SHAPE, seed=5, test_cases=2, affine=oblique_affine())
    write_job(root / "job.xml", output="out", arch=ARCH, data=DATA, hyper=HYPER, extra=QUIET)
    run = subprocess.run([sys.executable, "-m", "autocnnp", "run", str(root / "job.xml")], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return root


@pytest.mark.ranks
def test_a_run_reports_per_class_metrics_and_keeps_the_best_epoch(trained):
    with open(trained / "out" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 21))  # as the console numbers them
    assert {"dice_fg", "dice/background", "dice/left_atrium", "iou/left_atrium"} <= set(rows[0])
    assert float(rows[-1]["dice_fg"]) == pytest.approx(float(rows[-1]["dice/left_atrium"]))  # one foreground class
    best = json.loads((trained / "out" / "checkpoints" / "best").read_text())
    assert best["metric"] == "dice_fg" and best["value"] == max(float(r["dice_fg"]) for r in rows)
    assert float(rows[best["epoch"] - 1]["dice_fg"]) == best["value"]
    manifest = json.loads((trained / "out" / "manifest.json").read_text())
    assert manifest["dataset"]["classes"] == {"0": "background", "1": "left atrium"}


@pytest.mark.ranks
def test_predict_keeps_the_source_grid_and_evaluate_scores_the_held_out_labels(trained, cli):
    job, out = trained / "job.xml", trained / "out"
    rc, text, err = cli("predict", job, "--probabilities")
    assert rc == 0, err
    assert "classes: 0 background, 1 left atrium" in text
    for case in ("case_006", "case_007"):
        source, predicted = nib.load(trained / "data" / "imagesTs" / f"{case}.nii.gz"), \
            nib.load(out / "predictions" / f"{case}.nii.gz")
        assert predicted.shape == SHAPE and np.allclose(predicted.affine, source.affine)
        for code in ("qform_code", "sform_code"):
            assert int(predicted.header[code]) == int(source.header[code])
        files = [out / "predictions" / f"{case}_prob-{k}-{name}.nii.gz" for k, name in enumerate(("background",
                                                                                                "left_atrium"))]
        probs = np.stack([nib.load(f).get_fdata() for f in files], axis=-1)  # a float32 volume per class
        assert all(nib.load(f).get_data_dtype() == np.float32 for f in files)
        assert probs.shape == (*SHAPE, 2) and np.allclose(probs.sum(axis=-1), 1, atol=1e-4)
        assert np.array_equal(probs.argmax(axis=-1), np.asarray(predicted.dataobj))
    rc, text, err = cli("evaluate", out / "predictions", trained / "data", "--out", out / "eval.json")
    assert rc == 0, err
    report = json.loads((out / "eval.json").read_text())
    assert [c["case"] for c in report["cases"]] == ["case_006", "case_007"]  # the held-out labels, from labelsTs/
    overall = report["overall"]
    assert overall["dice/left_atrium"] >= HELD_OUT_DICE, overall
    assert 0 < overall["hd95/left_atrium"] < 20 and 0 < overall["asd/left_atrium"] <= overall["hd95/left_atrium"]
    print(f"held-out foreground Dice {overall['dice/left_atrium']:.3f}, HD95 {overall['hd95/left_atrium']:.2f} mm")


@pytest.mark.ranks
def test_the_checkpoint_is_enough_to_predict(trained, cli, tmp_path):
    out = trained / "out"
    rc, _, err = cli("predict", "--checkpoint", out / "checkpoints" / "latest", "--input", trained / "data",
                     "--out", tmp_path / "alone")
    assert rc == 0, err
    rc, _, err = cli("predict", trained / "job.xml", "--set", "data.size=48", "--set", "architecture.base_channels=16",
                     "--out", tmp_path / "other", "--checkpoint", "latest", "--threads", "1")
    assert rc == 0 and "warning: the job says size 48 (trained: 32); using what the checkpoint was trained with" in err
    assert "warning: the job says architecture base_channels 16 (trained: 8)" in err
    reference = tmp_path / "reference"
    assert cli("predict", trained / "job.xml", "--out", reference)[0] == 0
    for case in ("case_006", "case_007"):
        expected = np.asarray(nib.load(reference / f"{case}.nii.gz").dataobj)
        for folder in ("alone", "other"):
            assert np.array_equal(np.asarray(nib.load(tmp_path / folder / f"{case}.nii.gz").dataobj), expected)
    rc, _, err = cli("predict", trained / "job.xml", "--checkpoint", "best", "--out", tmp_path / "best")
    assert rc == 0, err
    rc, _, err = cli("predict", "--checkpoint", "best")
    assert rc == 2 and "--checkpoint best needs the job whose run it is" in err


@pytest.mark.ranks
def test_predict_refuses_data_of_other_modalities(trained, cli, tmp_path):
    data = shutil.copytree(trained / "data", tmp_path / "data")
    index = json.loads((data / "dataset.json").read_text())
    trained_on = index["modality"]["0"]
    index["modality"] = {"0": "CT"}
    (data / "dataset.json").write_text(json.dumps(index))
    rc, _, err = cli("predict", "--checkpoint", trained / "out", "--input", data, "--out", tmp_path / "p")
    assert rc == 2 and f"the channels the model reads are the modalities CT here, but it was trained on {trained_on}" \
        in err, err
    assert not (tmp_path / "p").exists()


@pytest.mark.ranks
def test_predict_with_a_zoo_model(trained, cli, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("AUTOCNNP_ZOO", str(tmp_path / "zoo"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # where predict keeps pulled models
    rc, out, err = cli("zoo", "publish", trained / "out", "--name", "atrium")
    assert rc == 0 and "zoo:atrium/1" in out, err
    rc, _, err = cli("predict", "--model", "zoo:atrium", "--input", trained / "data", "--out", tmp_path / "zoo-pred")
    assert rc == 0, err
    rc, _, err = cli("predict", trained / "job.xml", "--checkpoint", "best", "--out", tmp_path / "best")
    assert rc == 0, err
    for case in ("case_006", "case_007"):  # the published model is the run's best checkpoint
        assert np.array_equal(np.asarray(nib.load(tmp_path / "zoo-pred" / f"{case}.nii.gz").dataobj),
                              np.asarray(nib.load(tmp_path / "best" / f"{case}.nii.gz").dataobj))


@pytest.mark.ranks
@pytest.mark.slow
def test_every_class_of_the_brain_example_learns():
    """The brain example as shipped (size 128, 20 epochs, 2 ranks) on the synthetic stand-in: every foreground
    class reaches Dice >= 0.5 on held-out cases (benchmarks/brain_every_class.py; seed 0 gave edema 0.999,
    non-enhancing tumour 0.938, enhancing tumour 0.991). A few minutes: the smallest class is learned last."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "brain_every_class.py"), "--seeds", "0"],
                          capture_output=True, text=True, timeout=2400)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    print(done.stdout)
