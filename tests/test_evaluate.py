"""`autocnnp evaluate`: per-class and region Dice, surface distances in mm, CSV or JSON, any split."""

from __future__ import annotations

import csv
import json
import math
import multiprocessing
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from autocnnp.training.surface import surface_distances

LABELS = {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}
SPACING = (1.0, 1.5, 3.0)


def nested(shape, lo) -> np.ndarray:
    """Nested boxes: 1 outside, 3 inside it, 2 innermost (the brain-tumour layout)."""
    label = np.zeros(shape, dtype=np.uint8)
    for value, margin in ((1, lo), (3, lo + 2), (2, lo + 4)):
        label[margin:-margin, margin:-margin, 1:-1] = value
    return label


@pytest.fixture
def dataset(tmp_path):
    """A dataset with a training case and a test case whose label sits in labelsTs/, and predictions."""
    root = tmp_path / "ds"
    affine = np.diag([*SPACING, 1.0])
    truth = {"case_000": nested((16, 16, 5), 2), "case_001": nested((16, 16, 5), 3)}
    pred = {"case_000": nested((16, 16, 5), 3), "case_001": np.where(nested((16, 16, 5), 3) == 2, 3, nested((16, 16, 5), 3))}
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs", "../pred"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(truth["case_000"], affine), root / "labelsTr" / "case_000.nii.gz")
    nib.save(nib.Nifti1Image(truth["case_000"].astype(np.float32), affine), root / "imagesTr" / "case_000.nii.gz")
    nib.save(nib.Nifti1Image(truth["case_001"], affine), root / "labelsTs" / "case_001.nii.gz")
    nib.save(nib.Nifti1Image(truth["case_001"].astype(np.float32), affine), root / "imagesTs" / "case_001.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "name": "t", "modality": {"0": "x"}, "labels": LABELS, "numTraining": 1, "numTest": 1,
        "training": [{"image": "./imagesTr/case_000.nii.gz", "label": "./labelsTr/case_000.nii.gz"}],
        "test": ["./imagesTs/case_001.nii.gz"]}))
    for name, volume in pred.items():
        nib.save(nib.Nifti1Image(volume, affine), tmp_path / "pred" / f"{name}.nii.gz")
    return root, tmp_path / "pred", truth, pred


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * (a & b).sum() / (a.sum() + b.sum()) if a.sum() + b.sum() else 1.0


def test_per_class_region_and_surface_metrics_of_every_split(cli, dataset):
    root, preds, truth, pred = dataset
    rc, text, err = cli("evaluate", preds, root, "--out", preds / "report.json")
    assert rc == 0, err
    report = json.loads((preds / "report.json").read_text())
    rows = {r["case"]: r for r in report["cases"]}
    assert sorted(rows) == ["case_000", "case_001"]  # a training label and a held-out one from labelsTs/
    for case, row in rows.items():
        t, p = truth[case], pred[case]
        for value, name in ((1, "edema"), (3, "enhancing_tumour")):
            assert row[f"dice/{name}"] == pytest.approx(dice(t == value, p == value))
        regions = {"whole_tumour": (1, 2, 3), "tumour_core": (2, 3), "enhancing_tumour": (3,)}
        for region, values in regions.items():
            assert row[f"region_dice/{region}"] == pytest.approx(dice(np.isin(t, values), np.isin(p, values)))
        hd95, asd = surface_distances(p == 1, t == 1, SPACING)
        assert row["hd95/edema"] == pytest.approx(hd95) and row["asd/edema"] == pytest.approx(asd)
    assert rows["case_000"]["hd95/edema"] > 0  # one voxel off in x (1 mm) and y (1.5 mm)
    # case_001 predicts no class 2: its HD95 and ASD are the penalty, the image diagonal in mm, counted in the mean
    diagonal = math.dist((0, 0, 0), np.multiply((16, 16, 5), SPACING))
    assert rows["case_001"]["dice/non-enhancing_tumor"] == 0
    assert rows["case_001"]["hd95/non-enhancing_tumor"] == rows["case_001"]["asd/non-enhancing_tumor"] == diagonal
    overall = report["overall"]
    assert overall["hd95/non-enhancing_tumor"] == pytest.approx((rows["case_000"]["hd95/non-enhancing_tumor"]
                                                                 + diagonal) / 2)
    assert overall["penalised/non-enhancing_tumor"] == 1 and "penalised/edema" not in overall
    assert report["classes"]["2"] == "non-enhancing tumor"
    assert "MONAI" in overall["convention"] and "image diagonal" in overall["convention"]
    assert "region_dice/whole_tumour" in text.splitlines()[0] and "overall: dice " in text and "pooled: dice " in text


def test_overall_is_the_mean_over_cases_and_pooled_a_labelled_second_figure(cli, tmp_path):
    """A large good case and a small poor one: the overall row is the mean of the cases (Decathlon, BraTS); the
    pooled row, from the summed voxels, is kept apart and says so, in the CSV and the JSON."""
    affine = np.diag([*SPACING, 1.0])
    big_truth, big_pred = nested((40, 40, 12), 4), nested((40, 40, 12), 4)
    big_pred[4:6] = 0  # a little of the edema missed
    small_truth, small_pred = nested((16, 16, 5), 2), nested((16, 16, 5), 5)
    for folder, volumes in (("ref", (big_truth, small_truth)), ("pred", (big_pred, small_pred))):
        (tmp_path / folder).mkdir()
        for name, volume in zip(("big", "small"), volumes):
            nib.save(nib.Nifti1Image(volume, affine), tmp_path / folder / f"{name}.nii.gz")
    rc, _, err = cli("evaluate", tmp_path / "pred", tmp_path / "ref", "--out", tmp_path / "m.json")
    assert rc == 0, err
    report = json.loads((tmp_path / "m.json").read_text())
    cases = {r["case"]: r for r in report["cases"]}
    per_case = [dice(t == 1, p == 1) for t, p in ((big_truth, big_pred), (small_truth, small_pred))]
    assert [cases[c]["dice/class_1"] for c in ("big", "small")] == pytest.approx(per_case)
    assert report["overall"]["dice/class_1"] == pytest.approx(sum(per_case) / 2)
    pooled = dice(np.concatenate([big_truth.ravel(), small_truth.ravel()]) == 1,
                  np.concatenate([big_pred.ravel(), small_pred.ravel()]) == 1)
    assert report["pooled"]["dice/class_1"] == pytest.approx(pooled) != pytest.approx(sum(per_case) / 2)
    assert "mean over the 2 case(s)" in report["overall"]["convention"]
    assert "summed over every voxel" in report["pooled"]["convention"] and "hd95/class_1" not in report["pooled"]
    rc, _, err = cli("evaluate", tmp_path / "pred", tmp_path / "ref", "--out", tmp_path / "m.csv")
    with open(tmp_path / "m.csv") as f:
        rows = list(csv.DictReader(f))
    assert rc == 0 and [r["case"] for r in rows] == ["big", "small", "overall", "pooled"]
    assert rows[0]["convention"] == "" and "mean over the 2 case(s)" in rows[2]["convention"]
    assert float(rows[3]["dice/class_1"]) == pytest.approx(pooled, rel=1e-5)


def test_a_missed_class_never_improves_the_surface_means_and_is_never_null(cli, dataset):
    """case_001 misses class 2 (dataset fixture). Had it found class 2 a few voxels off, the overall HD95 and
    ASD would be lower, not higher; a class every case misses still has finite means."""
    root, preds, truth, pred = dataset
    rc, _, err = cli("evaluate", preds, root, "--out", preds / "missed.json")
    assert rc == 0, err
    missed = json.loads((preds / "missed.json").read_text())["overall"]
    found = pred["case_001"].copy()
    found[6:8, 6:8, 2:3] = 2  # class 2 found, off by a few voxels
    nib.save(nib.Nifti1Image(found, np.diag([*SPACING, 1.0])), preds / "case_001.nii.gz")
    rc, _, err = cli("evaluate", preds, root, "--out", preds / "found.json")
    assert rc == 0, err
    found = json.loads((preds / "found.json").read_text())
    assert found["cases"][1]["hd95/non-enhancing_tumor"] > found["cases"][0]["hd95/non-enhancing_tumor"]
    for metric in ("hd95", "asd"):
        assert missed[f"{metric}/non-enhancing_tumor"] > found["overall"][f"{metric}/non-enhancing_tumor"]
    for name, volume in pred.items():  # now every case misses class 2
        nib.save(nib.Nifti1Image(np.where(volume == 2, 3, volume).astype(np.uint8), np.diag([*SPACING, 1.0])),
                 preds / f"{name}.nii.gz")
    rc, _, err = cli("evaluate", preds, root, "--out", preds / "all.json")
    overall = json.loads((preds / "all.json").read_text())["overall"]
    assert rc == 0 and overall["hd95/non-enhancing_tumor"] == pytest.approx(math.dist((0, 0, 0), (16, 24, 15)))
    assert overall["penalised/non-enhancing_tumor"] == 2


def test_workers_score_the_cases_in_parallel_to_the_same_report(cli, dataset):
    root, preds, truth, pred = dataset
    reports = []
    for workers in ("1", "2"):
        rc, text, err = cli("evaluate", preds, root, "--out", preds / f"w{workers}.json", "--workers", workers)
        assert rc == 0, err
        reports.append(json.loads((preds / f"w{workers}.json").read_text()))
    assert reports[0] == reports[1] and [r["case"] for r in reports[1]["cases"]] == ["case_000", "case_001"]
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 4), np.uint8), np.diag([*SPACING, 1.0])), preds / "case_001.nii.gz")
    rc, _, err = cli("evaluate", preds, root, "--out", preds / "bad.json", "--workers", "2")
    assert rc == 2 and "differs from reference shape" in err and not (preds / "bad.json").exists()
    assert multiprocessing.active_children() == []  # the pool was shut down


def test_volume_confusion_counts_as_the_confusion_matrix_slab_by_slab():
    import torch

    from autocnnp.training.metrics import confusion_matrix, volume_confusion

    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, size=(7, 6, 9)).astype(np.uint8)
    pred = np.asfortranarray(rng.integers(0, 4, size=truth.shape).astype(np.uint8))  # another memory layout
    expected = confusion_matrix(torch.from_numpy(np.ascontiguousarray(pred)), torch.from_numpy(truth), 5).numpy()
    for slab in (1, 50, 10**6):  # a slice at a time, several, all at once
        assert np.array_equal(volume_confusion(pred, truth, 5, slab=slab), expected)
    with pytest.raises(ValueError, match="target value 3 is outside"):
        volume_confusion(pred, truth, 3)


def test_csv_by_extension_custom_regions_and_refusals(cli, dataset):
    root, preds, truth, pred = dataset
    rc, _, err = cli("evaluate", preds, root, "--out", preds / "m.csv", "--regions", "tumour=1,2,3")
    assert rc == 0, err
    with open(preds / "m.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == ["case_000", "case_001", "overall", "pooled"]
    assert "region_dice/tumour" in rows[0] and "region_dice/whole_tumour" not in rows[0]
    assert float(rows[1]["hd95/non-enhancing_tumor"]) == pytest.approx(math.dist((0, 0, 0), (16, 24, 15)))
    assert math.isclose(float(rows[0]["dice/edema"]), dice(truth["case_000"] == 1, pred["case_000"] == 1), rel_tol=1e-5)
    rc, _, err = cli("evaluate", preds, root, "--out", preds / "m.txt")
    assert rc == 2 and "is neither a .csv nor a .json file" in err
    rc, _, err = cli("evaluate", preds, root, "--regions", "tumour=x")
    assert rc == 2 and "--regions" in err
    rc, _, err = cli("evaluate", preds, root / "labelsTr" / "..", "--out", Path(preds) / "n.csv", "--num-classes", "2")
    assert rc == 2 and "outside" in err


def test_a_prediction_keeps_the_sources_qform_and_sform_apart(tmp_path):
    """A scanner image whose qform (code 1) and sform (code 2) differ: both matrices and codes are kept."""
    from autocnnp.data.volumes import save_label

    qform = np.array([[0, -1.2, 0, 10], [0.9, 0, 0, -7.5], [0, 0, 2.5, 3], [0, 0, 0, 1]])
    sform = np.array([[0.95, 0.1, 0, -12.5], [-0.1, 1.1, 0, 4], [0, 0, 2.5, 1], [0, 0, 0, 1]])
    src = nib.Nifti1Image(np.zeros((5, 4, 3), np.int16), sform)
    src.set_qform(qform, code=1)
    src.set_sform(sform, code=2)
    nib.save(src, tmp_path / "src.nii.gz")
    src = nib.load(tmp_path / "src.nii.gz")
    save_label(np.ones((5, 4, 3)), src.affine, src.header, tmp_path / "pred.nii.gz")
    pred = nib.load(tmp_path / "pred.nii.gz")
    assert np.allclose(pred.get_qform(), src.get_qform(), atol=1e-5) and np.allclose(pred.get_sform(), sform)
    assert int(pred.header["qform_code"]) == 1 and int(pred.header["sform_code"]) == 2


def test_references_left_without_a_prediction_are_named(cli, dataset, tmp_path):
    root, preds, truth, pred = dataset
    refs = tmp_path / "refs"
    refs.mkdir()
    for name in ("labelsTr/case_000.nii.gz", "labelsTs/case_001.nii.gz"):
        (refs / Path(name).name).write_bytes((root / name).read_bytes())
    (preds / "case_001.nii.gz").unlink()
    rc, text, err = cli("evaluate", preds, refs, "--out", tmp_path / "m.json")
    assert rc == 0, err
    assert "note: 1 reference case(s) have no prediction and are not scored: case_001" in err
    assert [r["case"] for r in json.loads((tmp_path / "m.json").read_text())["cases"]] == ["case_000"]
    rc, _, err = cli("evaluate", preds, root)  # a dataset: only the split that was predicted is expected
    assert rc == 0 and "no prediction" not in err


def test_declared_labels_with_a_gap_are_scored_by_their_values(cli, dataset):
    """BraTS as distributed labels its classes 0, 1, 2 and 4: evaluate scores such predictions as they are."""
    root, preds, truth, pred = dataset
    index = json.loads((root / "dataset.json").read_text())
    index["labels"] = {"0": "background", "1": "edema", "2": "necrosis", "4": "enhancing"}
    (root / "dataset.json").write_text(json.dumps(index))
    for folder, volumes in ((root / "labelsTr", {"case_000": truth["case_000"]}), (preds, pred)):
        for name, volume in volumes.items():
            nib.save(nib.Nifti1Image(np.where(volume == 3, 4, volume).astype(np.uint8), np.diag([*SPACING, 1.0])),
                     folder / f"{name}.nii.gz")
    rc, _, err = cli("evaluate", preds, root, "--out", preds / "gap.json", "--regions", "none")
    assert rc == 0, err
    row = json.loads((preds / "gap.json").read_text())["cases"][0]
    assert row["dice/enhancing"] == pytest.approx(dice(truth["case_000"] == 3, pred["case_000"] == 3))
