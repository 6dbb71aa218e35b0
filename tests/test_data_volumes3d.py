"""3D data (issue 22): spacing and resampling, the volume cache, patches, 3D augmentation, the decathlon 3D
setting and its bad inputs."""

import gzip
import os
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from autocnnp.components.datasets.decathlon import Config, Decathlon
from autocnnp.core.errors import DataError
from autocnnp.data.augment import RandomAffine3D
from autocnnp.data.batches import EpochIndices
from autocnnp.data.checks import check_dataset
from autocnnp.data.index import read_dataset
from autocnnp.data.resample import preprocess_label, preprocess_volume, to_source
from autocnnp.data.spacing import auto_patch, parse_spacing, patch_of, target_spacing
from autocnnp.data.synth import TUBES_SPACING, write_synthetic_dataset
from autocnnp.data.volumes3d import PatchDataset, VolumeDataset, build_volume_cache

SHAPE = (24, 24, 8)


@pytest.fixture(scope="module")
def tubes(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("tubes"), "tubes", cases=3, shape=SHAPE, seed=1)


@pytest.fixture(scope="module")
def cache(tubes, tmp_path_factory) -> Path:
    return build_volume_cache(tubes, tmp_path_factory.mktemp("cache") / "c", target_spacing=(1.0, 1.0, 1.5),
                              normalise=True)


def _set_spacing(path: Path, zooms) -> None:
    """Write ``zooms`` into the header's pixdim[1:4] as stored (nibabel would correct them on save)."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[80:92] = np.asarray(zooms, "<f4").tobytes()
    path.write_bytes(gzip.compress(bytes(raw)))


# ---------------------------------------------------------------- resampling

def test_resampling_keeps_label_values_and_gives_the_target_grid():
    rng = np.random.default_rng(0)
    label = rng.choice(np.array([0, 3, 7], np.uint8), size=(20, 18, 6))
    out = preprocess_label(label, (1.0, 1.0, 3.0), (0.5, 1.5, 1.0))
    assert out.shape == (18, 40, 12)  # [D=Z, H=X, W=Y]: 6*3/1, 20*1/0.5, 18*1/1.5
    assert set(np.unique(out)) <= {0, 3, 7}
    image = rng.random((20, 18, 6, 2)).astype(np.float32)
    volume = preprocess_volume(image, (1.0, 1.0, 3.0), (0.5, 1.5, 1.0), modalities=[1], normalise=False)
    assert volume.shape == (1, 18, 40, 12) and volume.dtype == np.float32
    ref = F.interpolate(torch.from_numpy(image[..., 1].transpose(2, 0, 1).copy())[None, None], size=(18, 40, 12),
                        mode="trilinear", align_corners=False)[0]
    np.testing.assert_allclose(volume, ref.numpy(), atol=1e-6)


def test_probabilities_go_back_to_the_source_grid_in_chunks_as_one_trilinear_resize():
    probs = torch.rand(3, 9, 10, 11)
    ref = F.interpolate(probs[None], size=(6, 20, 18), mode="trilinear", align_corners=False)[0]
    got = to_source(probs, (20, 18, 6), chunk_bytes=1)  # one source slice at a time
    assert got.shape == (20, 18, 6, 3)
    np.testing.assert_allclose(got, ref.permute(2, 3, 1, 0).numpy(), atol=1e-6)
    assert (to_source(probs, (20, 18, 6), labels=True) == ref.argmax(0).permute(1, 2, 0).numpy()).all()


def test_target_spacing_and_auto_patch(tubes):
    cases = read_dataset(tubes).cases("training")
    assert target_spacing(cases, "median") == TUBES_SPACING
    assert target_spacing(cases, "0.5,0.5,1") == (0.5, 0.5, 1.0)
    with pytest.raises(DataError, match="neither 'median'"):
        parse_spacing("1,0,1")
    assert patch_of(cases, "auto", "1,1,1", 10 ** 9) == (16, 16, 16)  # 24x24x24 rounded down to multiples of 16
    assert auto_patch([(40, 200, 200)], 64 ** 3) == (32, 80, 96)  # shrunk, the largest side first, to the budget
    assert patch_of(cases, "8,16,16", "median", 1) == (8, 16, 16)


@pytest.mark.parametrize("zooms", [(1.0, 0.0, 1.0), (1.0, 1.0, -2.0), (np.nan, 1.0, 1.0)])
def test_a_bad_header_spacing_is_one_data_error_naming_the_file(tubes, tmp_path, zooms):
    ds = shutil.copytree(tubes, tmp_path / "ds")
    bad = ds / "imagesTr" / "case_001.nii.gz"
    _set_spacing(bad, zooms)
    assert not check_dataset(ds, split="training").problems  # 2D does not resample: no problem
    problems = check_dataset(ds, split="training", spacing=True).problems
    assert len(problems) == 1 and str(bad) in str(problems[0]) and "pixdim" in str(problems[0])
    job = Decathlon(Config(train=ds, dimension="3d", patch_size="8,16,16"))
    with pytest.raises(DataError, match="not three positive numbers"):
        job.prepare(seed=0, cache_dir=tmp_path / "cache")


# ---------------------------------------------------------------- the cache and its patches

def test_the_cache_is_built_once_and_shared(tubes, cache, tmp_path):
    images = cache / "images.npy"
    before = images.stat().st_mtime_ns
    again = build_volume_cache(tubes, cache, target_spacing=(1.0, 1.0, 1.5), normalise=True)  # a second rank
    assert again == cache
    assert images.stat().st_mtime_ns == before  # nothing written
    meta = VolumeDataset(cache).meta
    assert meta["dtype"] == {"images": "float16", "labels": "uint8"}
    assert [c["shape"] for c in meta["cases"]] == [[16, 24, 24]] * 3  # Z 8 x 3 mm / 1.5 mm
    other = build_volume_cache(tubes, tmp_path / "c2", target_spacing=(2.0, 2.0, 3.0), normalise=True)
    assert VolumeDataset(other).meta["cases"][0]["shape"] == [8, 12, 12]


def test_patches_are_drawn_from_seed_epoch_and_index_only(cache):
    def patches(seed, indices):
        return PatchDataset(cache, patch=(8, 16, 16), length=12, foreground_share=0.33, seed=seed).read_batch(
            np.asarray(indices))

    x, y = patches(0, [3, 15, 4])
    assert x.shape == (3, 1, 8, 16, 16) and x.dtype == torch.float16 and y.shape == (3, 8, 16, 16)
    again, _ = patches(0, [15, 3])  # other batches, another process: the same patch per index
    assert torch.equal(again[1], x[0]) and torch.equal(again[0], x[1])
    assert not torch.equal(x[0], x[1])  # item 3 of epochs 0 and 1 differ
    assert not torch.equal(patches(1, [3])[0][0], x[0])
    order = EpochIndices(range(4), 12)
    order.set_epoch(2)
    assert list(order) == [24, 25, 26, 27]


def test_foreground_share_centres_patches_on_labelled_voxels(cache):
    def centred(share):
        ds = PatchDataset(cache, patch=(2, 2, 2), length=300, foreground_share=share, seed=0)
        x, y = ds.read_batch(np.arange(300))
        return (y[:, 1, 1, 1] > 0).float().mean().item()  # the patch's centre voxel

    background = centred(0.0)
    assert centred(1.0) == 1.0
    assert background < 0.15
    assert 0.33 - 0.1 < (centred(0.33) - background) / (1 - background) < 0.33 + 0.1


def test_cases_smaller_than_the_patch_are_padded_and_said_once(tubes, tmp_path, capsys):
    built = build_volume_cache(tubes, tmp_path / "c", target_spacing=(1.0, 1.0, 3.0), normalise=True)
    ds = PatchDataset(built, patch=(16, 16, 16), length=3, foreground_share=0.0, seed=0)
    x, y = ds.read_batch(np.arange(3))
    assert x.shape == (3, 1, 16, 16, 16)
    assert (x[:, :, :4] == 0).all() and (x[:, :, -4:] == 0).all() and (x[:, :, 4:12] != 0).any()  # D 8, centred
    job = Decathlon(Config(train=tubes, dimension="3d", patch_size="16,16,16", spacing="1,1,3", augment=False))
    assert job.prepare(seed=0, cache_dir=tmp_path / "cache") == 2 * 8  # patches_per_volume x training cases
    err = capsys.readouterr().err
    assert err.count("smaller than the patch 16x16x16") == 1 and "padded with zeros" in err


def test_a_spacing_blowing_a_case_beyond_the_budget_is_refused_naming_it(tubes, tmp_path):
    job = Decathlon(Config(train=tubes, dimension="3d", patch_size="8,16,16", spacing="0.1,0.1,0.1",
                           volume_budget_mb=32))
    blown = r"case case_000 .* becomes 240x240x240 .* beyond the budget of 32 MiB"
    with pytest.raises(DataError, match=blown):
        job.prepare(seed=0, cache_dir=tmp_path / "cache")
    problems = job.check().problems  # validate --data says it too
    assert len(problems) == 1 and re.search(blown, str(problems[0]))


def test_the_3d_bundle_validates_whole_volumes_through_a_sliding_window(tubes, tmp_path):
    bundle = Decathlon(Config(train=tubes, dimension="3d", patch_size="8,16,16", spacing="1,1,1.5",
                              valid_fraction=0.34)).datasets(world=_World(), seed=0, cache_dir=tmp_path)
    assert len(bundle.train) == 2 * 8 and bundle.train.epoch_indexed and bundle.valid_batch_size == 1
    image, label = bundle.valid.read_batch(np.array([0]))
    assert image.shape == (1, 1, 16, 24, 24) and label.shape == (1, 16, 24, 24)
    seen = bundle.infer(lambda x: torch.zeros(x.shape[0], 3, *x.shape[2:]), image.float())
    assert seen.shape == (1, 3, 16, 24, 24) and bundle.class_names == ("background", "sphere", "tube")
    assert Config(train=tubes, dimension="3d", patch_size="8,16,16").input_size() == (8, 16, 16)


def test_validate_checks_the_3d_patch_against_the_architecture(tubes, tmp_path, cli):
    from jobfiles import write_job

    def job(patch: str, norm: str = "instance") -> Path:
        data = (f'<data format="decathlon"><train><path>{tubes}</path></train><param name="dimension">3d</param>'
                f'<param name="patch_size">{patch}</param></data>')
        return write_job(tmp_path / "job.xml", arch='<CNN_archi name="unet3d"><param name="depth">3</param>'
                         f'<param name="norm">{norm}</param></CNN_archi>', data=data)

    rc, out, err = cli("validate", job("16,16,16"))
    assert rc == 0, err
    bad = job("6,16,16")
    line = next(n for n, text in enumerate(bad.read_text().splitlines(), 1) if "patch_size" in text)
    rc, out, err = cli("validate", bad)
    assert rc == 2 and f"job.xml:{line}:" in err and "6x16x16" in err and "4 or 8 instead of 6" in err
    rc, out, err = cli("validate", job("auto"))  # 16 x 24 x 24 resampled (median spacing): 16 x 16 x 16
    assert rc == 0, err
    rc, out, err = cli("validate", job("4,4,4"))  # one voxel at the deepest level: instance norm over one value
    assert rc == 2 and err.startswith(f"autocnnp: {bad}:{line}:") and err.count("\n") == 1
    assert ("architecture 'unet3d' needs at least 2 voxels at its deepest level (depth 3, instance norm: one voxel has "
            "no variance), but the patch 4x4x4 leaves 1x1x1 there. Hint: give a larger patch (8x4x4, say) or a smaller "
            "depth.") in err
    assert cli("validate", job("4,4,4", norm="batch"))[0] == 0


class _World:
    rank, world_size = 0, 1


# ---------------------------------------------------------------- augmentation and the synthetic set

def test_3d_augmentation_is_seeded_per_item_and_batched():
    aug = RandomAffine3D(seed=4, tilt=5.0, translate=2.0)
    x = torch.randn(3, 2, 6, 10, 12)
    y = torch.randint(0, 3, (3, 6, 10, 12))
    out, moved = aug.batch(x, y, epoch=1, indices=[5, 6, 7])
    one, lone = aug.batch(x[1:2], y[1:2], epoch=1, indices=[6])
    torch.testing.assert_close(out[1:2], one)
    assert torch.equal(moved[1:2], lone) and set(moved.unique().tolist()) <= {0, 1, 2}
    assert not torch.equal(aug.batch(x[1:2], y[1:2], epoch=2, indices=[6])[0], one)
    still = RandomAffine3D(rotation=0, zoom=(1, 1), flips=False, intensity=0, gamma=0)
    same, kept = still.batch(x, y, epoch=0, indices=[0, 1, 2])
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)
    assert torch.equal(kept, y)
    quarter = RandomAffine3D(rotation=0, zoom=(1, 1), flips=False, intensity=0, gamma=0)
    theta = quarter.theta(90.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, (4, 8, 8))[None]
    turned = F.grid_sample(x[:1, :1, :4, :8, :8], F.affine_grid(theta, [1, 1, 4, 8, 8], align_corners=False),
                           align_corners=False, mode="nearest")
    assert any(torch.equal(turned, torch.rot90(x[:1, :1, :4, :8, :8], k, (3, 4))) for k in (1, 3))


def test_tubes_look_alike_in_every_axial_slice(tubes):
    img = nib.load(str(tubes / "labelsTr" / "case_000.nii.gz"))
    label = np.asarray(img.dataobj)
    assert tuple(float(z) for z in img.header.get_zooms()) == TUBES_SPACING
    assert set(np.unique(label)) == {0, 1, 2}
    image = np.asarray(nib.load(str(tubes / "imagesTr" / "case_000.nii.gz")).dataobj)
    means = [image[label == v].mean() for v in (1, 2)]
    assert abs(means[0] - means[1]) < 0.05 * means[0]  # one intensity: only the shape along z differs
    tube_slices = [(label[..., z] == 2).any() for z in range(label.shape[2])]
    assert all(tube_slices)  # a tube runs through every slice, a sphere through few
    assert sum((label[..., z] == 1).any() for z in range(label.shape[2])) < label.shape[2]


def test_the_synth_command_writes_tubes(tmp_path):
    from autocnnp.cli import main

    assert main(["synth", str(tmp_path / "t"), "--kind", "tubes", "--cases", "2", "--shape", "16", "16", "6"]) == 0
    assert read_dataset(tmp_path / "t").labels == {0: "background", 1: "sphere", 2: "tube"}
    assert os.path.isfile(tmp_path / "t" / "imagesTs" / "case_002.nii.gz")


def test_a_user_3d_architecture_reads_the_patch_once_however_often_its_dimension_is_asked(tubes, tmp_path,
                                                                                        monkeypatch):
    from jobfiles import write_job

    from autocnnp.generator.assemble import assemble

    (tmp_path / "net.py").write_text("import torch\n\n\ndef build(in_channels, num_classes):\n"
                                     "    return torch.nn.Conv3d(in_channels, num_classes, 1)\n")  # no size rule
    from autocnnp.data import spacing

    calls = []  # the automatic patch, from every training case's header
    monkeypatch.setattr(spacing, "patch_of", lambda *args: calls.append(args) or patch_of(*args))
    data = (f'<data format="decathlon"><train><path>{tubes}</path></train><param name="dimension">3d</param>'
            '<param name="patch_size">auto</param></data>')
    gen = assemble(write_job(tmp_path / "job.xml", arch="<CNN_archi><path>net.py</path></CNN_archi>", data=data))
    assert [gen.dimension for _ in range(3)] == ["3d"] * 3 and len(calls) == 1


def test_3d_start_up_reads_each_header_once_until_the_file_changes(tubes, tmp_path, monkeypatch):
    from autocnnp.data import spacing

    root = shutil.copytree(tubes, tmp_path / "tubes")  # files no earlier test read
    opened = []
    monkeypatch.setattr(spacing, "open_nifti", lambda path: opened.append(path.name) or nib.load(path))
    cases = read_dataset(root).cases("training")
    config = Config(train=root, dimension="3d", patch_size="auto")
    target_spacing(cases, "median")  # the spacing, then the automatic patch, as a 3D job starts
    assert config.input_size() == patch_of(cases, "auto", "median", config.patch_budget)
    assert sorted(opened) == [f"case_00{i}.nii.gz" for i in range(3)]
    os.utime(cases[0].image, ns=(1, 1))  # changed since: read again
    target_spacing(cases, "median")
    assert opened[3:] == ["case_000.nii.gz"]


def test_checking_a_3d_dataset_reads_each_image_header_once_with_the_start_up(tubes, tmp_path, monkeypatch):
    root = shutil.copytree(tubes, tmp_path / "tubes")  # files no earlier test read
    load, opened = nib.load, []
    monkeypatch.setattr(nib, "load", lambda path, *a, **k: opened.append(Path(path)) or load(path, *a, **k))
    cases = read_dataset(root).cases("training")
    assert not check_dataset(root, split="training", spacing=True).problems  # as a 3D job starts: check, then plan
    patch_of(cases, "auto", "median", 1 << 20)
    assert sorted(p.name for p in opened if p.parent.name == "imagesTr") == [f"case_00{i}.nii.gz" for i in range(3)]
