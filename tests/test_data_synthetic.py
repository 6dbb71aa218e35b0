"""Synthetic Decathlon-style datasets: layout, determinism, geometry, affine."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from autocnnp.data.synth import KINDS, affine_for, write_synthetic_dataset

SHAPE = (24, 24, 8)


@pytest.fixture(scope="module")
def brain(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("brain"), "brain", cases=3, shape=SHAPE, seed=1)


@pytest.fixture(scope="module")
def atrium(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("atrium"), "atrium", cases=2, shape=SHAPE, seed=1,
                                   test_cases=2)


def test_kinds():
    assert KINDS == ("brain", "atrium", "tubes")


def test_layout_and_dataset_json(brain):
    index = json.loads((brain / "dataset.json").read_text())
    for key in ("name", "modality", "labels", "numTraining", "numTest", "training", "test"):
        assert key in index
    assert index["modality"] == {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
    assert set(index["labels"]) == {"0", "1", "2", "3"}
    assert index["numTraining"] == 3 and len(index["training"]) == 3
    assert index["numTest"] == 1 and len(index["test"]) == 1
    for entry in index["training"]:
        assert (brain / entry["image"]).is_file() and (brain / entry["label"]).is_file()
        assert entry["image"].startswith("./imagesTr/case_") and entry["label"].startswith("./labelsTr/case_")
    assert (brain / index["test"][0]).is_file() and "imagesTs" in index["test"][0]
    assert not (brain / "labelsTr" / "case_003.nii.gz").exists()


def test_brain_volumes_and_nested_labels(brain):
    img = nib.load(str(brain / "imagesTr" / "case_000.nii.gz"))
    lab = nib.load(str(brain / "labelsTr" / "case_000.nii.gz"))
    assert img.shape == SHAPE + (4,)
    assert lab.shape == SHAPE and lab.get_data_dtype() == np.uint8
    image, label = img.get_fdata(), np.asanyarray(lab.dataobj)
    assert set(np.unique(label)) == {0, 1, 2, 3}
    tumour = label > 0
    # the non-enhancing core (2) sits inside the tumour and touches no background
    assert (ndimage.binary_dilation(label == 2) <= tumour).all()
    # the enhancing rim (3) surrounds the core: the core's centre of mass is inside the rim+core region
    com = np.rint(ndimage.center_of_mass(label == 2)).astype(int)
    assert label[tuple(com)] in (2, 3)
    # skull-stripped: zero outside the head, non-zero inside, tumour inside the head
    head = image[..., 0] != 0
    assert head.any() and (~head).any()
    assert (tumour <= head).all()
    # per-modality contrast: edema is brighter than brain on FLAIR, the rim is brightest on t1gd
    brain_only = head & ~tumour
    assert image[label == 1, 0].mean() > 1.5 * image[brain_only, 0].mean()
    assert image[label == 3, 2].mean() > image[label == 1, 2].mean()


def test_atrium_is_thin_hollow_shell(atrium):
    img = nib.load(str(atrium / "imagesTr" / "case_000.nii.gz"))
    label = np.asanyarray(nib.load(str(atrium / "labelsTr" / "case_000.nii.gz")).dataobj)
    assert img.shape == SHAPE
    assert set(np.unique(label)) == {0, 1}
    shell = label == 1
    filled = ndimage.binary_fill_holes(shell)
    assert filled.sum() > shell.sum()  # hollow
    assert shell.sum() < 0.1 * shell.size  # small
    assert len(list((atrium / "imagesTs").iterdir())) == 2


def test_affine_is_non_identity_and_shared(brain):
    img = nib.load(str(brain / "imagesTr" / "case_001.nii.gz"))
    lab = nib.load(str(brain / "labelsTr" / "case_001.nii.gz"))
    np.testing.assert_allclose(img.affine, affine_for(SHAPE))
    np.testing.assert_allclose(lab.affine, img.affine)
    assert not np.allclose(img.affine, np.eye(4))
    np.testing.assert_allclose(img.header.get_zooms()[:3], (1.0, 1.0, 1.5))


def test_seeded_and_deterministic(tmp_path):
    a = write_synthetic_dataset(tmp_path / "a", "atrium", cases=2, shape=(12, 12, 6), seed=5, test_cases=0)
    b = write_synthetic_dataset(tmp_path / "b", "atrium", cases=3, shape=(12, 12, 6), seed=5, test_cases=0)
    c = write_synthetic_dataset(tmp_path / "c", "atrium", cases=2, shape=(12, 12, 6), seed=6, test_cases=0)
    for sub in ("imagesTr", "labelsTr"):
        for name in ("case_000.nii.gz", "case_001.nii.gz"):
            x = np.asanyarray(nib.load(str(a / sub / name)).dataobj)
            y = np.asanyarray(nib.load(str(b / sub / name)).dataobj)
            np.testing.assert_array_equal(x, y)
    x = np.asanyarray(nib.load(str(a / "imagesTr" / "case_000.nii.gz")).dataobj)
    z = np.asanyarray(nib.load(str(c / "imagesTr" / "case_000.nii.gz")).dataobj)
    assert not np.array_equal(x, z)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        write_synthetic_dataset(tmp_path, "liver")
    with pytest.raises(ValueError, match="shape"):
        write_synthetic_dataset(tmp_path, "brain", shape=(32, 32))


def test_synthetic_and_decathlon_do_not_import_torch():
    code = ("import sys, autocnnp.data.synth, autocnnp.data.index, autocnnp.data.volumes, autocnnp.data.checks; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_in_memory_synthetic_slices_equal_generated_ones_and_stay_intact():
    import torch

    from autocnnp.data.synthetic_slices import SyntheticSliceDataset

    lazy = SyntheticSliceDataset("brain", 5, 16, 4, 4, seed=3, in_memory=False)
    eager = SyntheticSliceDataset("brain", 5, 16, 4, 4, seed=3, in_memory=True)
    for i in range(5):
        for a, b in zip(lazy[i], eager[i]):
            assert torch.equal(a, b)
    image, _ = eager[2]
    image.zero_()  # a caller working in place must not change the stored slice
    assert torch.equal(eager[2][0], lazy[2][0])
