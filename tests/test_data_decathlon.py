"""Dataset index reading, case loading and validation of bad inputs."""

import json
import pickle
import shutil

import nibabel as nib
import numpy as np
import pytest

from autocnnp.core.errors import DataError
from autocnnp.data.checks import validate_dataset
from autocnnp.data.index import Case, read_dataset, read_dataset_index
from autocnnp.data.synth import affine_for, write_synthetic_dataset
from autocnnp.data.volumes import load_case

SHAPE = (12, 12, 6)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("ds"), "brain", cases=2, shape=SHAPE, seed=3)


@pytest.fixture
def ds(pristine, tmp_path):
    """A fresh, writable copy of a small valid brain dataset."""
    return shutil.copytree(pristine, tmp_path / "ds")


def _save(array, affine, path):
    nib.save(nib.Nifti1Image(array, affine), str(path))


def _only(errors, needle):
    assert len(errors) == 1, [str(e) for e in errors]
    text = str(errors[0])
    assert needle in text, text
    assert "Hint:" in text and "\n" not in text
    return errors[0]


# ---------------------------------------------------------------- reading and loading

def test_read_index_splits(ds):
    training = read_dataset_index(ds)
    assert [c.name for c in training] == ["case_000", "case_001"]
    assert all(c.labelled and c.image.is_file() and c.label.is_file() for c in training)
    test = read_dataset_index(ds, split="test")
    assert [c.name for c in test] == ["case_002"] and test[0].label is None
    assert len(read_dataset_index(ds / "dataset.json", split="all")) == 3
    info = read_dataset(ds)
    assert info.modalities[1] == "T1w" and info.labels[0] == "background"
    assert info.modality_index("t1w") == 1 and info.modality_index(3) == 3
    with pytest.raises(DataError, match="not declared"):
        info.modality_index("PET")


def test_round_trip_load_case(ds):
    case = read_dataset_index(ds)[0]
    image, label, affine, header = load_case(case)
    assert image.shape == SHAPE + (4,) and image.dtype == np.float32
    assert label.shape == SHAPE and np.issubdtype(label.dtype, np.integer)
    assert set(np.unique(label)) <= {0, 1, 2, 3}
    np.testing.assert_allclose(affine, affine_for(SHAPE))
    assert header.get_zooms()[:3] == (1.0, 1.0, 1.5)
    np.testing.assert_array_equal(label, np.asanyarray(nib.load(str(case.label)).dataobj))
    test_image, test_label, _, _ = load_case(read_dataset_index(ds, "test")[0])
    assert test_image.shape == SHAPE + (4,) and test_label is None


def test_load_3d_image_gets_channel_axis(tmp_path):
    root = write_synthetic_dataset(tmp_path, "atrium", cases=1, shape=SHAPE, test_cases=0)
    image, label, _, _ = load_case(read_dataset_index(root)[0])
    assert image.shape == SHAPE + (1,) and label.shape == SHAPE


def test_csv_index(ds):
    sub = ds / "lists"
    sub.mkdir()
    csv = sub / "cases.csv"
    csv.write_text("image,label\n../imagesTr/case_000.nii.gz,../labelsTr/case_000.nii.gz\n"
                   f"{(ds / 'imagesTr' / 'case_001.nii.gz').resolve()},../labelsTr/case_001.nii.gz\n"
                   "../imagesTs/case_002.nii.gz,\n")
    training = read_dataset_index(csv)
    assert [c.name for c in training] == ["case_000", "case_001"]
    assert training[0].image.resolve() == (ds / "imagesTr" / "case_000.nii.gz").resolve()
    assert read_dataset_index(csv, "test")[0].label is None
    assert validate_dataset(csv) == []
    assert load_case(training[1])[0].shape == SHAPE + (4,)
    bad = sub / "noheader.csv"
    bad.write_text("../imagesTr/case_000.nii.gz,../labelsTr/case_000.nii.gz\n")
    with pytest.raises(DataError, match="header"):
        read_dataset_index(bad)
    # label range check for a CSV index needs num_classes
    assert len(validate_dataset(csv, num_classes=2)) == 2


def test_clean_dataset_validates(ds):
    assert validate_dataset(ds) == []
    assert validate_dataset(ds, num_classes=4) == []


def test_missing_root_and_index(tmp_path):
    _only(validate_dataset(tmp_path / "nope"), "does not exist")
    _only(validate_dataset(tmp_path), "no dataset.json")
    with pytest.raises(DataError):
        read_dataset_index(tmp_path)


# ---------------------------------------------------------------- bad files

def test_corrupt_file(ds):
    path = ds / "imagesTr" / "case_001.nii.gz"
    path.write_bytes(b"this is not a nifti file at all" * 10)
    err = _only(validate_dataset(ds), "case_001.nii.gz")
    assert err.path == path
    with pytest.raises(DataError, match="case_001"):
        load_case(read_dataset_index(ds)[1])


def test_truncated_gzip_file(ds):
    path = ds / "imagesTr" / "case_000.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    err = _only(validate_dataset(ds), "imagesTr/case_000.nii.gz")
    assert "truncated" in str(err) or "cannot be read" in str(err)
    with pytest.raises(DataError, match="case_000"):
        load_case(read_dataset_index(ds)[0])


def test_truncated_uncompressed_file(ds):
    raw = ds / "labelsTr" / "case_000.nii"
    lab = nib.load(str(ds / "labelsTr" / "case_000.nii.gz"))
    _save(np.asanyarray(lab.dataobj), lab.affine, raw)
    index = json.loads((ds / "dataset.json").read_text())
    index["training"][0]["label"] = "./labelsTr/case_000.nii"
    (ds / "dataset.json").write_text(json.dumps(index))
    assert validate_dataset(ds) == []
    raw.write_bytes(raw.read_bytes()[:-100])
    _only(validate_dataset(ds), "truncated")


def test_shape_mismatch(ds):
    _save(np.zeros((12, 12, 5), np.uint8), affine_for(SHAPE), ds / "labelsTr" / "case_000.nii.gz")
    _only(validate_dataset(ds), "does not match image shape")
    with pytest.raises(DataError, match="does not match"):
        load_case(read_dataset_index(ds)[0])


def test_affine_mismatch(ds):
    path = ds / "labelsTr" / "case_001.nii.gz"
    lab = nib.load(str(path))
    shifted = lab.affine.copy()
    shifted[0, 3] += 0.5
    _save(np.asanyarray(lab.dataobj), shifted, path)
    _only(validate_dataset(ds), "affine")
    # below the tolerance of 1e-3 is fine
    shifted[0, 3] = lab.affine[0, 3] + 1e-4
    _save(np.asanyarray(lab.dataobj), shifted, path)
    assert validate_dataset(ds) == []


def test_missing_label_file(ds):
    (ds / "labelsTr" / "case_001.nii.gz").unlink()
    err = _only(validate_dataset(ds), "does not exist")
    assert err.path.name == "case_001.nii.gz"


def test_label_out_of_range(ds):
    path = ds / "labelsTr" / "case_000.nii.gz"
    lab = nib.load(str(path))
    data = np.asanyarray(lab.dataobj).copy()
    data[0, 0, 0] = 7
    _save(data, lab.affine, path)
    err = _only(validate_dataset(ds), "{7}")
    assert "case_000" in str(err)


def test_label_non_integer(ds):
    path = ds / "labelsTr" / "case_000.nii.gz"
    lab = nib.load(str(path))
    data = np.asanyarray(lab.dataobj).astype(np.float32)
    data[1, 1, 1] = 0.5
    _save(data, lab.affine, path)
    _only(validate_dataset(ds), "non-integer")
    with pytest.raises(DataError, match="non-integer"):
        load_case(read_dataset_index(ds)[0])


def test_num_classes_disagrees_with_labels(ds):
    errors = validate_dataset(ds, num_classes=3)
    assert any("asks for 3 classes" in str(e) for e in errors)
    assert any("{3}" in str(e) for e in errors)


def test_inconsistent_dataset_json(ds):
    index = json.loads((ds / "dataset.json").read_text())
    index["numTraining"] = 5
    del index["labels"]
    (ds / "dataset.json").write_text(json.dumps(index))
    errors = validate_dataset(ds)
    texts = " | ".join(map(str, errors))
    assert len(errors) == 2, texts
    assert "'numTraining' is 5 but 2 training entries" in texts
    assert "missing the key(s) labels" in texts
    assert all(e.path == ds / "dataset.json" for e in errors)


def test_bad_dataset_json_structure(ds):
    index_file = ds / "dataset.json"
    index_file.write_text('{"name": "x", "training": [}')
    _only(validate_dataset(ds), "not valid JSON")
    index_file.write_text(json.dumps({"name": "x"}))
    _only(validate_dataset(ds), "no 'training' list")
    index_file.write_text(json.dumps({"name": "x", "training": [{"image": "a.nii.gz"}]}))
    with pytest.raises(DataError, match="training entry 0"):
        read_dataset_index(ds)


def test_duplicate_and_channel_count(ds):
    index = json.loads((ds / "dataset.json").read_text())
    index["training"].append(index["training"][0])
    index["numTraining"] = 3
    index["modality"] = {"0": "T1w"}
    (ds / "dataset.json").write_text(json.dumps(index))
    texts = " | ".join(map(str, validate_dataset(ds)))
    assert "listed 2 times" in texts
    assert "4 channel(s) but dataset.json declares 1 modalities" in texts


def test_data_error_format_and_pickle(tmp_path):
    err = DataError(tmp_path / "x.nii.gz", "label values {7} are odd.", "fix it.")
    assert str(err) == f"{tmp_path / 'x.nii.gz'}: label values {{7}} are odd. Hint: fix it."
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.path == err.path
    assert str(DataError(None, "no hint")) == "no hint."
    assert isinstance(Case("a", tmp_path), Case)
