"""Sliding-window inference: windows, Gaussian weights, padding, mirroring, against what a network gives."""

import pytest
import torch
from torch import nn

from autocnnp.training.sliding_window import SlidingWindow, gaussian_importance, window_starts


def _pointwise(channels=2, classes=3):
    torch.manual_seed(0)
    return nn.Conv3d(channels, classes, 1).eval()


def test_one_patch_volume_is_the_network_output():
    model = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 3, 3, padding=1)).eval()
    x = torch.randn(2, 2, 8, 12, 16)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(SlidingWindow((8, 12, 16), batch=3)(model, x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(20, 17, 9), (5, 33, 16), (8, 12, 16)])
@pytest.mark.parametrize("overlap", [0.0, 0.5, 0.75])
def test_pointwise_network_is_reproduced_everywhere(shape, overlap):
    """A translation-equivariant network gives its own output at every voxel, whatever the windows, overlap or
    padding (odd shapes, volumes smaller than the patch along an axis)."""
    model = _pointwise()
    x = torch.randn(1, 2, *shape)
    with torch.no_grad():
        expected = model(x)
    window = SlidingWindow((8, 12, 16), overlap=overlap, batch=4, mirror=overlap == 0.5)
    out = window(model, x)
    assert out.shape == (1, 3, *shape) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(window.probabilities(model, x), torch.softmax(expected, 1), rtol=1e-5, atol=1e-5)


def test_windows_cover_the_volume_with_the_overlap_asked():
    assert window_starts(16, 16, 0.5) == [0]
    assert window_starts(32, 16, 0.5) == [0, 8, 16]
    assert window_starts(33, 16, 0.5) == [0, 6, 11, 17]  # evenly spread, the last flush with the end
    for size, patch, overlap in [(100, 24, 0.5), (37, 8, 0.25), (200, 96, 0.5)]:
        starts = window_starts(size, patch, overlap)
        assert starts[0] == 0 and starts[-1] == size - patch
        assert all(0 < b - a <= patch * (1 - overlap) for a, b in zip(starts, starts[1:]))


def test_weights_sum_to_the_summed_importance():
    """A constant network's weighted mean is that constant; the Gaussian peaks at 1 in the centre, sigma 1/8."""
    importance = gaussian_importance((8, 16, 32))
    assert importance.shape == (8, 16, 32) and importance.min() > 0
    assert importance.max() == pytest.approx(1.0, abs=1e-3)
    # one axis: exp(-0.5 (d / (side / 8))^2) at d half a voxel either side of the centre
    side = 32
    ratio = importance[4, 8, 0] / importance[4, 8, 15]
    d0, d15 = 15.5, 0.5
    assert ratio.item() == pytest.approx(torch.exp(torch.tensor(-0.5 * ((d0 / 4) ** 2 - (d15 / 4) ** 2))).item(),
                                         rel=1e-4)
    constant = lambda t: torch.full((t.shape[0], 2, *t.shape[2:]), 3.0)  # noqa: E731
    out = SlidingWindow((8, 16, side), overlap=0.5)(constant, torch.zeros(1, 1, 19, 40, 50))
    torch.testing.assert_close(out, torch.full_like(out, 3.0))


def test_centre_of_a_window_outweighs_its_border():
    """A network that sees its own window (output = window index) is trusted at its centre: on the voxel at a
    window's centre, that window's output dominates the weighted mean."""
    calls = []

    def marker(t):
        calls.append(len(calls))
        return torch.full((t.shape[0], 1, *t.shape[2:]), float(len(calls) - 1))

    out = SlidingWindow((1, 1, 16), overlap=0.5)(marker, torch.zeros(1, 1, 1, 1, 32))
    assert len(calls) == 3  # windows at 0, 8, 16
    assert out[0, 0, 0, 0, 15].item() == pytest.approx(1.0, abs=0.02)  # window 1 ([8, 24)) centre
    assert out[0, 0, 0, 0, 0].item() == 0.0 and out[0, 0, 0, 0, 31].item() == 2.0


def test_mirroring_averages_the_flips():
    """A network that is not flip-equivariant: mirroring gives the mean of the eight flipped outputs."""
    def ramp(t):
        return t + torch.arange(t.shape[-1], dtype=t.dtype)

    x = torch.randn(1, 1, 4, 4, 6)
    out = SlidingWindow((4, 4, 6), mirror=True)(ramp, x)
    torch.testing.assert_close(out, x + 2.5)  # the ramp and its flip average to (W - 1) / 2
