"""predict's fast paths: slices batched across the volume into one array, autocast, channels_last, the
default threads; the GPU path (pinned memory, asynchronous copies) where a GPU is present."""

from __future__ import annotations

import os
import shutil
import types

import nibabel as nib
import numpy as np
import pytest
import torch
from jobfiles import QUIET, write_job

from autocnnp.components.architectures.unet import UNet
from autocnnp.core.processes import default_threads, usable_cores
from autocnnp.data.synth import write_synthetic_dataset
from autocnnp.generator.assemble import assemble
from autocnnp.training.loop import model_card
from autocnnp.training.precision import autocast_dtype
from autocnnp.training.predictor import (
    default_batch,
    prepare_network,
    slice_probabilities,
)

CPU = torch.device("cpu")
BF16_TOLERANCE = 0.03  # probabilities; bf16 keeps 8 bits of mantissa
ARCH = '<CNN_archi name="unet"><param name="depth">3</param><param name="base_channels">8</param></CNN_archi>'
DATA = ('<data format="decathlon"><train><path>data</path></train><test><path>data</path></test>'
        '<param name="size">32</param></data>')


def network(classes: int) -> UNet:
    torch.manual_seed(0)
    return UNet(2, classes, depth=3, base_channels=8, norm="batch").eval()


def volume(depth: int = 7) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((depth, 2, 32, 32)).astype(np.float32)


@pytest.fixture
def torch_threads():
    """predict sets torch's threads for the process: put them back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("classes", [3, 1])
def test_probabilities_do_not_depend_on_the_batching(classes):
    slices = volume()
    whole, _ = slice_probabilities(network(classes), slices, 16, CPU, False, None, False)
    assert whole.shape == (7, max(classes, 2), 32, 32) and whole.dtype == np.float32
    assert np.allclose(whole.sum(axis=1), 1, atol=1e-5)
    for batch in (1, 3):  # 3 leaves a last batch of one slice
        parts, _ = slice_probabilities(network(classes), slices, batch, CPU, False, None, False)
        np.testing.assert_allclose(parts, whole, atol=1e-5)


@pytest.mark.parametrize(("channels_last", "dtype", "tolerance"),
                         [(True, None, 1e-5), (False, torch.bfloat16, BF16_TOLERANCE),
                          (True, torch.bfloat16, BF16_TOLERANCE)])
@pytest.mark.slow
def test_channels_last_and_autocast_change_the_arithmetic_not_the_answer(channels_last, dtype, tolerance):
    slices = volume()
    reference, _ = slice_probabilities(network(3), slices, 4, CPU, True, None, False)
    net, seen = prepare_network(network(3), CPU, channels_last), []
    net.down[0][0].register_forward_hook(lambda module, inputs, output: seen.append((inputs[0], output)))
    probs, _ = slice_probabilities(net, slices, 4, CPU, True, dtype, channels_last)
    assert len(seen) == 2 * 3  # two batches, three flips each
    for x, y in seen:  # the flipped views too
        assert x.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert y.dtype == (dtype or torch.float32)
    difference = np.abs(probs - reference).max()
    assert probs.dtype == np.float32 and difference <= tolerance and (dtype is None or difference > 0)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this system")
def test_default_threads_are_the_cores_this_process_may_use(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(cores)})
        assert usable_cores() == default_threads() == 1
    finally:
        os.sched_setaffinity(0, cores)
    assert default_threads() == len(cores)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # as the trainer: an explicit setting wins
    assert default_threads() == 3


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    """A dataset with two test cases of 9 slices and a checkpoint of an untrained U-Net with its model card."""
    root = tmp_path_factory.mktemp("predict")
    write_synthetic_dataset(root / "data", "atrium", cases=1, shape=(20, 24, 9), seed=3, test_cases=2)
    gen = assemble(write_job(root / "job.xml", arch=ARCH, data=DATA, extra=QUIET))
    torch.manual_seed(0)
    net = gen.action("architecture_injection").build(in_channels=1, num_classes=2)
    data = types.SimpleNamespace(in_channels=1, num_classes=2, class_names=("background", "left atrium"))
    torch.save({"model": net.state_dict(), "model_card": model_card(gen, data)}, root / "untrained.pt")
    return root


@pytest.mark.slow
def test_predict_in_bf16_and_channels_last_agrees_with_float32(cli, untrained, tmp_path, torch_threads):
    common = ("predict", "--checkpoint", untrained / "untrained.pt", "--input", untrained / "data", "--probabilities")
    rc, text, err = cli(*common, "--out", tmp_path / "fp32", "--batch-size", "4")
    assert rc == 0 and "float32, batches of 4" in text, err
    rc, text, err = cli(*common, "--out", tmp_path / "bf16", "--precision", "bf16", "--channels-last",
                        "--batch-size", "3")
    assert rc == 0 and "bfloat16 autocast, channels_last, batches of 3" in text, err
    for case in ("case_001", "case_002"):
        exact, fast = (np.stack([nib.load(f).get_fdata() for f in sorted((tmp_path / run).glob(f"{case}_prob-*"))], -1)
                       for run in ("fp32", "bf16"))
        difference = np.abs(exact - fast).max()  # float32 in other batches and layouts: ~1e-7
        assert exact.shape == (20, 24, 9, 2) and 1e-5 < difference <= BF16_TOLERANCE


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_gpu_path_agrees_with_the_cpu():
    slices, gpu = volume(9), torch.device("cuda")
    reference, _ = slice_probabilities(network(3), slices, 4, CPU, True, None, False)
    fp32, _ = slice_probabilities(prepare_network(network(3), gpu, False), slices, 4, gpu, True, None, False)
    np.testing.assert_allclose(fp32, reference, atol=5e-3)  # cuDNN may convolve in TF32
    fast, _ = slice_probabilities(prepare_network(network(3), gpu, True), slices, 4, gpu, True,
                                  autocast_dtype("auto", gpu), True)
    assert fast.dtype == np.float32 and np.abs(fast - reference).max() <= BF16_TOLERANCE


def test_default_batch_keeps_cpu_batches_to_one_large_slice():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert [default_batch(cpu, size) for size in (512, 600, 256, 128, 64)] == [1, 1, 4, 16, 16]
    assert default_batch(gpu, 512) == 16


def old_to_slices(image: np.ndarray, modalities, size: int) -> np.ndarray:
    """What predict fed the network before it worked a few slices at a time: the whole volume in float32, z-scored,
    sliced, resized."""
    from autocnnp.data.slices import resize, select_modalities, take_slices, zscore

    volume = zscore(select_modalities(np.array(image, dtype=np.float32, order="C"), modalities))
    return resize(take_slices(volume, None, np.arange(volume.shape[2]))[0], (size, size))


def test_predict_input_is_made_a_few_slices_at_a_time_from_the_volume_as_stored(monkeypatch):
    """A 2-channel int16 volume as NIfTI stores it (Fortran order): the model input equals the whole-volume
    computation, and the float copies made at once hold a few slices, not the volume."""
    import tracemalloc

    from autocnnp.components.datasets.decathlon import SliceTransform
    from autocnnp.data import slices

    rng = np.random.default_rng(0)
    stored = np.asfortranarray(rng.integers(-1000, 1500, size=(96, 80, 24, 3)).astype(np.int16))
    stored[:20] = 0  # outside the body: stays 0
    transform = SliceTransform(32, [2, 0], True, None, 2)
    expected = old_to_slices(stored, [2, 0], 32)
    monkeypatch.setattr(slices, "CHUNK_BYTES", 96 * 80 * 2 * 4 * 3, raising=False)  # three slices of two channels
    tracemalloc.start()
    try:
        got = transform.to_slices(stored, "case.nii.gz")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got.shape == (24, 2, 32, 32) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    volume_float32 = 96 * 80 * 24 * 2 * 4  # the two channels the model reads (the old path: all three, and float64)
    assert peak < volume_float32, f"{peak} bytes at once"


def test_source_grid_is_the_argmax_of_the_resized_probabilities_a_few_slices_at_a_time(monkeypatch):
    """Slice probabilities back on the source grid, then the argmax (the first class of a tie), as volumes in
    NIfTI's order; with the probabilities asked for or not, only a few slices are resized at once."""
    import tracemalloc

    from autocnnp.data import slices
    from autocnnp.data.slices import resize
    from autocnnp.training.predictor import source_grid

    rng = np.random.default_rng(1)
    probs = rng.random((10, 3, 16, 12), dtype=np.float32)
    probs[:, 1, :4] = probs[:, 2, :4] = 2  # ties: class 1 wins
    resized = resize(probs, (40, 36))
    expected = np.moveaxis(resized.argmax(axis=1), 0, 2)
    monkeypatch.setattr(slices, "CHUNK_BYTES", 3 * 40 * 36 * 4 * 2)  # two slices
    for keep in (False, True):
        tracemalloc.start()
        try:
            labels, grid = source_grid(probs, (40, 36), keep)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert labels.dtype == np.uint8 and labels.flags.f_contiguous and np.array_equal(labels, expected)
        assert (labels[:, :, 0] == 1).sum() > 0 and peak < labels.size + (grid.nbytes if keep else 0) + resized.nbytes / 3
        if keep:
            assert grid.shape == (3, 40, 36, 10) and grid[0].flags.f_contiguous
            np.testing.assert_array_equal(grid, np.transpose(resized, (1, 2, 3, 0)))


@pytest.mark.parametrize("bad", ["not-nifti", "channels", "truncated"])
def test_a_refused_predict_creates_nothing(cli, untrained, tmp_path, torch_threads, bad):
    """Each input's header is checked before anything is written; no --out folder (nor its parents) is made."""
    images = tmp_path / "images"
    images.mkdir()
    good = untrained / "data" / "imagesTs" / "case_001.nii.gz"
    shutil.copy(good, images / "a_good.nii.gz")  # predicted first, were it not for the check
    if bad == "not-nifti":
        (images / "b_bad.nii.gz").write_bytes(b"not a NIfTI image" * 10)
    elif bad == "channels":
        nib.save(nib.Nifti1Image(np.zeros((20, 24, 9, 2), np.float32), np.eye(4)), images / "b_bad.nii.gz")
    else:  # a header that reads, voxels cut short: found when the volume is read, before any write
        (images / "a_good.nii.gz").unlink()
        nib.save(nib.Nifti1Image(np.ones((20, 24, 9), np.float32), np.eye(4)), images / "b_bad.nii")
        (images / "b_bad.nii").write_bytes((images / "b_bad.nii").read_bytes()[:2000])
    out = tmp_path / "new" / "predictions"
    rc, _, err = cli("predict", "--checkpoint", untrained / "untrained.pt", "--input", images, "--out", out)
    assert rc == 2 and "b_bad.nii" in err and err.count("\n") == 1, err
    assert not (tmp_path / "new").exists()
