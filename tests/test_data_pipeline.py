"""NIfTI data end to end: the example Decathlon jobs, the ``decathlon`` dataset component, a real
2-rank training run on a synthetic Decathlon dataset, and the data commands (synth, preprocess,
check-data, predict, evaluate)."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from autocnnp.core.errors import DataError
from autocnnp.data.synth import write_synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]
BRAIN_JOB = ROOT / "xml_configs" / "brain_tumour_unet.xml"
ATRIUM_JOB = ROOT / "xml_configs" / "left_atrium_fcn.xml"
TUBES_JOB = ROOT / "xml_configs" / "tubes_unet3d.xml"
AUTOCNNP = [sys.executable, "-m", "autocnnp"]
SHAPE = (32, 32, 8)
METRICS = ("dice", "pixel_accuracy", "mean_accuracy", "mean_iou", "fw_iou")


def small_job(src: Path, dst: Path, *, output: str = "out", **params) -> Path:
    """``src`` without comments, written to ``dst`` with its output and the named <param>/<property> values replaced."""
    text = re.sub(r"<!--.*?-->", "", src.read_text(), flags=re.S)
    text = re.sub(r"<output><path>[^<]*</path></output>", f"<output><path>{output}</path></output>", text)
    quiet = ('<monitoring><property name="progress">false</property><property name="tensorboard">false</property>'
             '<property name="plots">false</property></monitoring>')
    text = text.replace("</hyperparameters>", "</hyperparameters>" + quiet)
    for name, value in params.items():
        text, n = re.subn(rf'<(param|property|value) name="{name}">[^<]*</(param|property|value)>',
                          rf'<\1 name="{name}">{value}</\2>', text)
        assert n == 1, f"{name} occurs {n} times in {src.name}"
    dst.write_text(text)
    return dst


TINY_BRAIN = dict(depth=2, base_channels=4, norm="none", sync_batchnorm="false", slices_per_volume=4, size=32,
                  minibatch_size=2, end_epoch=2, warmup_epochs=1, lr=0.05)


def run(job: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([*AUTOCNNP, "run", str(job)], capture_output=True, text=True, timeout=timeout)


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def brain_data(tmp_path_factory) -> Path:
    """A pristine tiny brain dataset: 4 labelled cases and 1 test case of 32 x 32 x 8."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("brain") / "Task01_BrainTumour", "brain", cases=4,
                                   shape=SHAPE, seed=5, test_cases=1)


# --------------------------------------------------------------------------- (a) example jobs

@pytest.mark.parametrize("src,kind,folder,arch", [(BRAIN_JOB, "brain", "Task01_BrainTumour", "unet"),
                                                  (ATRIUM_JOB, "atrium", "Task02_Heart", "fcn"),
                                                  (TUBES_JOB, "tubes", "Tubes", "unet3d")])
def test_example_jobs_validate_once_their_data_exists(tmp_path, cli, src, kind, folder, arch):
    job = tmp_path / src.name
    shutil.copy(src, job)
    rc, _, err = cli("validate", job)
    assert rc == 2 and folder in err  # the data path is checked (relative to the job's folder)
    write_synthetic_dataset(tmp_path / "data" / folder, kind, cases=2, shape=(12, 12, 6))
    rc, out, err = cli("validate", job)
    assert rc == 0, err
    assert "valid" in out and f"{arch})" in out
    rc, out, _ = cli("check-data", tmp_path / "data" / folder)
    assert rc == 0 and "OK" in out


def test_validate_stays_torch_free_with_the_data_commands(tmp_path):
    job = tmp_path / BRAIN_JOB.name
    shutil.copy(BRAIN_JOB, job)
    write_synthetic_dataset(tmp_path / "data" / "Task01_BrainTumour", "brain", cases=2, shape=(12, 12, 6))
    # sys.modules, not -X importtime: the command modules are loaded by importlib, which importtime skips.
    # the whole parser (what --help builds, the data commands included) first, then validate
    code = ("import sys; from autocnnp.cli import main, parser; parser(); rc = main(['validate', sys.argv[1]]); "
            "print(rc, 'autocnnp.data.commands' in sys.modules, "
            "sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'nibabel'))))")
    result = subprocess.run([sys.executable, "-c", code, str(job)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[-1] == "0 True []"


# --------------------------------------------------------------------------- the component, in process

def _build(root, tmp_path, **kw):
    from autocnnp.components.datasets.decathlon import Config, Decathlon
    from autocnnp.core.world import World

    params = dict(train=root, slices_per_volume=4, slice_mode="labelled", size=32, modalities="all",
                  valid_fraction=0.25, augment=True, normalise=True)
    params.update(kw)
    return Decathlon(Config(**params)).datasets(world=World(), seed=3, cache_dir=tmp_path / "cache")


def test_component_splits_by_case_and_reads_channels_and_classes(brain_data, tmp_path, monkeypatch):
    import torch

    import autocnnp.data.checks as checks

    data = _build(brain_data, tmp_path)
    assert (data.in_channels, data.num_classes) == (4, 4)
    assert data.class_names == ("background", "edema", "non-enhancing tumor", "enhancing tumour")
    train_cases = {c["name"] for c in data.train.meta["cases"]}
    valid_cases = {c["name"] for c in data.valid.meta["cases"]}
    assert train_cases == {"case_000", "case_001", "case_002"} and valid_cases == {"case_003"}
    # 4 sampled slices per training volume; validation scores every slice of its volume
    assert len(data.train) == 12 and len(data.valid) == SHAPE[2]
    sampled = _build(brain_data, tmp_path, validation="slices")
    assert len(sampled.valid) == 4
    image, label = data.train[0]
    assert image.shape == (4, 32, 32) and image.dtype == torch.float32 and label.shape == (32, 32)
    assert data.augment.translate == pytest.approx(0.05) and "RandomAffine2D" in data.augmentation
    batch = torch.stack([image, data.train[1][0]]), torch.stack([label, data.train[1][1]])
    first, _ = data.augment.batch(*batch, epoch=0, indices=[0, 1])
    again, _ = data.augment.batch(*batch, epoch=1, indices=[0, 1])  # augmentation depends on the epoch
    assert not torch.equal(first, again) and torch.equal(first, data.augment.batch(*batch, epoch=0, indices=[0, 1])[0])
    caches = sorted((tmp_path / "cache").glob("train-*/meta.json"))
    assert len(caches) == 1
    stamp = caches[0].stat().st_mtime_ns
    # unchanged files: the validation verdict and the caches are reused (the other ranks, later runs)
    monkeypatch.setattr(checks, "check_dataset", lambda *a, **k: pytest.fail("validated twice"))
    _build(brain_data, tmp_path)
    assert caches[0].stat().st_mtime_ns == stamp
    assert sorted((tmp_path / "cache").glob("train-*/meta.json")) == caches
    _build(brain_data, tmp_path, size=16)  # other parameters: a second cache, the first is kept
    assert len(list((tmp_path / "cache").glob("train-*/meta.json"))) == 2


def test_component_modalities_valid_dataset_and_shared_cache(brain_data, tmp_path):
    valid = write_synthetic_dataset(tmp_path / "valid", "brain", cases=2, shape=SHAPE, seed=9, test_cases=0)
    shared = tmp_path / "shared"
    data = _build(brain_data, tmp_path, valid=valid, modalities="T1w, 3", augment=False, cache=shared)
    assert data.in_channels == 2 and data.num_classes == 4
    assert len(data.train) == 16 and len(data.valid) == 2 * SHAPE[2] and data.augment is None
    assert len(list(shared.glob("train-*/meta.json"))) == 1 and len(list(shared.glob("valid-*/meta.json"))) == 1
    assert not (tmp_path / "cache").exists()
    with pytest.raises(DataError, match="modality 'PD' is not declared"):
        _build(brain_data, tmp_path, modalities="PD")


def test_component_needs_two_cases_to_split(tmp_path):
    one = write_synthetic_dataset(tmp_path / "one", "atrium", cases=1, shape=(12, 12, 6), test_cases=0)
    with pytest.raises(DataError, match="cannot be split"):
        _build(one, tmp_path)


def test_component_reports_every_problem_file_before_building(brain_data, tmp_path):
    bad = shutil.copytree(brain_data, tmp_path / "bad")
    (bad / "labelsTr" / "case_001.nii.gz").write_bytes(b"not a nifti")
    (bad / "imagesTr" / "case_002.nii.gz").unlink()
    with pytest.raises(DataError) as info:
        _build(bad, tmp_path)
    text = str(info.value)
    assert "2 problems" in text and "labelsTr/case_001.nii.gz" in text and "imagesTr/case_002.nii.gz" in text
    assert "check-data" in text and "\n" not in text
    assert not list((tmp_path / "cache").glob("train-*"))  # nothing cached from a bad dataset
    # the verdict is stamped: a second rank (or run) reuses it; fixing a file invalidates it
    (stamp,) = (tmp_path / "cache").glob("validated-train-*.json")
    verdict = json.loads(stamp.read_text())
    assert len(verdict["problems"]) == 2
    shutil.copy(brain_data / "labelsTr" / "case_001.nii.gz", bad / "labelsTr" / "case_001.nii.gz")
    shutil.copy(brain_data / "imagesTr" / "case_002.nii.gz", bad / "imagesTr" / "case_002.nii.gz")
    assert _build(bad, tmp_path).num_classes == 4


# --------------------------------------------------------------------------- (d) CLI data commands

def test_synth_preprocess_and_check_data_commands(tmp_path, cli):
    data = tmp_path / "atrium"
    rc, out, err = cli("synth", data, "--kind", "atrium", "--cases", 3, "--shape", 16, 16, 6, "--seed", 2,
                       "--test-cases", 1)
    assert rc == 0, err
    assert "3 training and 1 test atrium" in out and str(data) in out
    index = json.loads((data / "dataset.json").read_text())
    assert index["numTraining"] == 3 and index["numTest"] == 1 and index["modality"] == {"0": "MRI"}
    assert nib.load(data / "imagesTr" / "case_000.nii.gz").shape == (16, 16, 6)

    rc, out, err = cli("preprocess", data, tmp_path / "cache", "--slices", 3, "--size", 16, "--mode", "even")
    assert rc == 0, err
    assert re.search(r"9 slices of 1 x 16 x 16 from 3 case\(s\) in [\d.]+ s", out), out
    assert (tmp_path / "cache" / "meta.json").is_file()
    rc, out, _ = cli("preprocess", data, tmp_path / "cache", "--slices", 3, "--size", 16, "--mode", "even")
    assert rc == 0 and "reused" in out
    rc, _, err = cli("preprocess", data, tmp_path / "c2", "--modalities", "T2w")
    assert rc == 2 and "T2w" in err and "Hint:" in err
    for option, value, problem in (("--size", 4, "at least 8"), ("--mode", "odd", "'odd'"),
                                   ("--foreground-fraction", 1.5, "between 0.0 and 1.0"), ("--slices", -1, "at least 0")):
        rc, _, err = cli("preprocess", data, tmp_path / "c3", option, value)  # the bounds of a job's decathlon data
        assert rc == 2 and f"autocnnp preprocess {option}" in err and problem in err and err.count("\n") == 1, err
    assert not (tmp_path / "c3").exists()

    rc, out, err = cli("check-data", data, "--num-classes", 2)
    assert rc == 0 and "OK" in out and "3 labelled and 1 test" in out, err
    (data / "labelsTr" / "case_001.nii.gz").write_bytes(b"\x1f\x8b garbage")
    rc, out, err = cli("check-data", data)
    assert rc == 2
    assert "labelsTr/case_001.nii.gz" in out and "1 problem(s)" in err
    rc, out, err = cli("check-data", tmp_path / "nowhere")
    assert rc == 2 and "nowhere" in out + err

    rc, _, err = cli("synth", tmp_path / "tiny", "--shape", 4, 4, 4)
    assert rc == 2 and "at least 6 voxels" in err


# --------------------------------------------------------------------------- (b), (e) a real run, predict, evaluate

@pytest.fixture(scope="module")
def trained(brain_data, tmp_path_factory):
    """A 2-rank, 2-epoch run of the brain example job (made tiny) on the synthetic dataset."""
    folder = tmp_path_factory.mktemp("run")
    shutil.copytree(brain_data, folder / "data" / "Task01_BrainTumour")
    job = small_job(BRAIN_JOB, folder / "job.xml", **TINY_BRAIN)
    result = run(job)
    return job, folder / "out", result


@pytest.mark.ranks
def test_two_rank_decathlon_run_caches_once_and_trains(trained):
    job, out, result = trained
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_csv(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for key in METRICS:
        assert 0 <= float(rows[-1][key]) <= 1, key
    metas = list((out / "cache").glob("train-*/meta.json"))
    assert len(metas) == 1
    meta = json.loads(metas[0].read_text())
    assert meta["count"] == 3 * 4 and meta["channels"] == 4 and meta["size"] == [32, 32]  # the training cases
    assert len(list((out / "cache").glob("valid-*/meta.json"))) == 1  # every slice of the validation volume
    assert not list(metas[0].parent.glob(".tmp-*"))  # one build, committed; the other rank reused it
    assert (out / "checkpoints" / "latest").is_file()


@pytest.mark.ranks
def test_corrupt_nifti_stops_the_run_naming_the_file(tmp_path, brain_data):
    shutil.copytree(brain_data, tmp_path / "data" / "Task01_BrainTumour")
    bad = tmp_path / "data" / "Task01_BrainTumour" / "imagesTr" / "case_002.nii.gz"
    bad.write_bytes(bad.read_bytes()[:3000])  # truncated
    job = small_job(BRAIN_JOB, tmp_path / "job.xml", **TINY_BRAIN)
    result = run(job, timeout=120)
    assert result.returncode != 0
    text = result.stderr + result.stdout
    assert "imagesTr/case_002.nii.gz" in text and "truncated or corrupt" in text
    assert not (tmp_path / "out" / "metrics.csv").exists()
    assert not list((tmp_path / "out" / "cache").glob("train-*"))


@pytest.mark.ranks
def test_predict_writes_label_volumes_on_the_source_grid_and_evaluate_scores_them(trained, brain_data, cli):
    job, out, result = trained
    assert result.returncode == 0, result.stderr[-3000:]

    rc, text, err = cli("predict", job)  # default: the dataset's test cases, latest checkpoint
    assert rc == 0, err
    assert re.search(r"case_004: 8 slices, inference [\d.]+ ms/slice, [\d.]+ s/volume", text), text
    assert [p.name for p in (out / "predictions").iterdir()] == ["case_004.nii.gz"]

    preds = out / "pred_train"
    rc, text, err = cli("predict", job, "--split", "training", "--out", preds,
                        "--checkpoint", out / "checkpoints" / "ckpt-epoch0002.pt")
    assert rc == 0, err
    assert "ms/slice" in text and "s/volume" in text
    assert sorted(p.name for p in preds.iterdir()) == [f"case_00{i}.nii.gz" for i in range(4)]
    for i in range(4):
        src = nib.load(brain_data / "imagesTr" / f"case_00{i}.nii.gz")
        pred = nib.load(preds / f"case_00{i}.nii.gz")
        assert pred.shape == SHAPE == src.shape[:3]
        np.testing.assert_allclose(pred.affine, src.affine, atol=1e-5)
        assert pred.header.get_zooms()[:3] == src.header.get_zooms()[:3]
        values = np.unique(np.asanyarray(pred.dataobj))
        assert values.dtype == np.uint8 and set(values.tolist()) <= {0, 1, 2, 3}

    csv_file = preds.parent / "eval.csv"
    rc, text, err = cli("evaluate", preds, brain_data, "--out", csv_file)
    assert rc == 0, err
    rows = read_csv(csv_file)
    assert [r["case"] for r in rows] == ["case_000", "case_001", "case_002", "case_003", "overall", "pooled"]
    for r in rows:
        for key in METRICS:
            assert 0.0 <= float(r[key]) <= 1.0, (r["case"], key)
    assert int(rows[-1]["voxels"]) == 4 * int(np.prod(SHAPE))
    assert "overall" in text and "dice" in text

    # the overall row is the mean over the cases; the pooled row comes from the summed confusion matrix
    assert float(rows[-2]["dice"]) == pytest.approx(sum(float(r["dice"]) for r in rows[:4]) / 4, abs=1e-6)
    import torch

    from autocnnp.training.metrics import confusion_matrix, segmentation_metrics

    total = sum(confusion_matrix(torch.from_numpy(np.asanyarray(nib.load(preds / f"case_00{i}.nii.gz").dataobj)
                                                  .astype(np.int64)),
                                 torch.from_numpy(np.asanyarray(nib.load(brain_data / "labelsTr" /
                                                                         f"case_00{i}.nii.gz").dataobj)
                                                  .astype(np.int64)), 4) for i in range(4))
    assert float(rows[-1]["dice"]) == pytest.approx(segmentation_metrics(total)["dice"], abs=1e-6)

    # a folder of reference labels works too; predictions without a reference are an error
    rc, _, err = cli("evaluate", preds, brain_data / "labelsTr", "--out", preds.parent / "eval2.csv")
    assert rc == 0, err
    rc, text, err = cli("evaluate", out / "predictions", brain_data)  # the test case, against labelsTs/
    assert rc == 0 and "case_004" in text, err
    stray = shutil.copytree(out / "predictions", preds.parent / "stray")
    (stray / "case_004.nii.gz").rename(stray / "other.nii.gz")
    rc, _, err = cli("evaluate", stray, brain_data)
    assert rc == 2 and "no prediction matches" in err


def test_evaluate_rejects_a_prediction_of_another_shape(tmp_path, cli, brain_data):
    preds = tmp_path / "preds"
    preds.mkdir()
    affine = nib.load(brain_data / "labelsTr" / "case_000.nii.gz").affine
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 8), np.uint8), affine), str(preds / "case_000.nii.gz"))
    rc, _, err = cli("evaluate", preds, brain_data)
    assert rc == 2 and "case_000.nii.gz" in err and "shape" in err


def test_predict_without_a_checkpoint_says_to_train_first(tmp_path, cli, brain_data):
    shutil.copytree(brain_data, tmp_path / "data" / "Task01_BrainTumour")
    job = small_job(BRAIN_JOB, tmp_path / "job.xml", **TINY_BRAIN)
    rc, _, err = cli("predict", job)
    assert rc == 2 and "no latest checkpoint" in err and "autocnnp run" in err


def test_a_job_may_point_at_a_preprocessed_cache_read_in_memory(brain_data, tmp_path, cli):
    """`autocnnp preprocess` output is used as it is (checked once, stamped; no second cache)."""
    import numpy as np

    train_cache, valid_cache = tmp_path / "pre-train", tmp_path / "pre-valid"
    for cache in (train_cache, valid_cache):
        rc, _, err = cli("preprocess", brain_data, cache, "--slices", "3", "--size", "16")
        assert rc == 0, err
    bundle = _build(train_cache, tmp_path, valid=valid_cache, in_memory=True)
    assert [p.name.split("-")[0] for p in (tmp_path / "cache").glob("*") if not p.name.startswith(".")] == \
        ["validated", "validated"]  # the two caches were checked (and stamped), nothing was cached again
    assert bundle.train.cache_dir == train_cache and bundle.valid.cache_dir == valid_cache
    image, label = bundle.valid[0]
    assert tuple(image.shape) == (4, 16, 16) and tuple(label.shape) == (16, 16)
    images, _ = bundle.valid._open()
    assert not isinstance(images, np.memmap)  # in_memory: a plain array
    mapped, _ = _build(train_cache, tmp_path, valid=valid_cache).valid._open()
    assert isinstance(mapped, np.memmap)


# --------------------------------------------------------------------------- one set of data checks everywhere


def test_preprocess_refuses_what_validate_refuses_and_validate_accepts_a_cache(brain_data, tmp_path, cli):
    import nibabel as nib

    data = shutil.copytree(brain_data, tmp_path / "data")
    cache = tmp_path / "cache"
    assert cli("preprocess", data, cache, "--slices", "4", "--size", "16")[0] == 0
    job = small_job(BRAIN_JOB, tmp_path / "job.xml", **TINY_BRAIN)
    text = job.read_text().replace("data/Task01_BrainTumour", str(cache))
    job.write_text(text)
    rc, out, err = cli("validate", "--data", job)
    assert rc == 0 and "data: 0 problem(s)" in out, err  # a preprocessed cache is valid data
    rc, out, _ = cli("check-data", cache)
    assert rc == 0 and "slice cache of" in out
    # a label outside the declared classes: preprocess refuses it as validate does, nothing is cached
    label = sorted((data / "labelsTr").iterdir())[0]
    img = nib.load(label)
    bad = np.asarray(img.dataobj).copy()
    bad[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(bad, img.affine, img.header), label)
    rc, _, err = cli("preprocess", data, tmp_path / "cache2", "--slices", "4", "--size", "16")
    assert rc == 2 and "label values {7} are outside the declared labels" in err
    assert not (tmp_path / "cache2").exists()


def test_a_broken_cache_and_empty_label_maps_are_reported(brain_data, tmp_path, cli):
    import nibabel as nib

    from autocnnp.data.preprocess import check_cache

    data = shutil.copytree(brain_data, tmp_path / "data")
    label = sorted((data / "labelsTr").iterdir())[1]
    img = nib.load(label)
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine, img.header), label)  # background only
    cache = tmp_path / "cache"
    rc, _, err = cli("preprocess", data, cache, "--slices", "4", "--size", "16")
    assert rc == 0 and "1 case(s) have a label map with background only (case_001)" in err
    assert check_cache(cache).empty_labels == ["case_001"]
    for source in (data, cache):  # validate --data notes it too, of a dataset and of a cache
        job = small_job(BRAIN_JOB, tmp_path / "job.xml", **TINY_BRAIN)
        job.write_text(job.read_text().replace("data/Task01_BrainTumour", str(source)))
        rc, out, err = cli("validate", "--data", job)
        assert rc == 0 and "1 note(s)" in out and "note: 1 case(s) have a label map with background only (case_001)" \
            in err, err
    images = np.load(cache / "images.npy", mmap_mode="r+")
    images[5, 0, 0, 0] = np.nan  # a damaged cache: training on it would diverge without naming a file
    images.flush()
    del images
    problems = check_cache(cache).problems
    assert len(problems) == 1 and "NaN or infinite" in str(problems[0]) and "images.npy" in str(problems[0])
    rc, out, err = cli("check-data", cache)
    assert rc == 2 and "1 problem(s) found" in err


def test_an_unreadable_test_image_does_not_stop_training(brain_data, tmp_path, cli):
    data = shutil.copytree(brain_data, tmp_path / "data")
    test_image = sorted((data / "imagesTs").iterdir())[0]
    test_image.write_bytes(b"not a nifti file" * 4)
    bundle = _build(data, tmp_path)  # the training cases are checked and cached
    assert len(bundle.train) == 12
    job = small_job(BRAIN_JOB, tmp_path / "job.xml", **TINY_BRAIN)
    job.write_text(job.read_text().replace("data/Task01_BrainTumour", str(data)))
    rc, out, err = cli("validate", "--data", job)  # validate --data reads every file, the test images too
    assert rc == 0 and "data: 0 problem(s)" in out and "1 note(s)" in out, err
    assert f"autocnnp: note: {test_image}" in err and "(a test case: training goes on without it, predict would " \
        "refuse it)" in err
