"""Tests for the segmentation losses."""

import math

import pytest
import torch

from autocnnp.training.losses import LOSSES, cross_entropy, dice_ce, dice_loss, get_loss

LN3 = math.log(3.0)


def two_pixel_case() -> tuple[torch.Tensor, torch.Tensor]:
    """1 sample, 2 classes, 1x2 image.

    Pixel A: logits (0, ln 3) -> p = (1/4, 3/4), true class 1.
    Pixel B: logits (0, 0)    -> p = (1/2, 1/2), true class 0.
    """
    logits = torch.tensor([[[[0.0, 0.0]], [[LN3, 0.0]]]], dtype=torch.float64)
    return logits, torch.tensor([[[1, 0]]])


def test_dice_hand_computed():
    # class 0: 2*(1/2) / ((1/4 + 1/2) + 1) = 1 / (7/4) = 4/7
    # class 1: 2*(3/4) / ((3/4 + 1/2) + 1) = (3/2) / (9/4) = 2/3
    # loss = 1 - (4/7 + 2/3) / 2 = 1 - 13/21 = 8/21
    logits, target = two_pixel_case()
    assert dice_loss(logits, target, eps=0.0).item() == pytest.approx(8 / 21)


def test_cross_entropy_hand_computed():
    # mean of -ln(3/4) (pixel A) and -ln(1/2) (pixel B)
    logits, target = two_pixel_case()
    expected = (math.log(4 / 3) + math.log(2)) / 2
    assert cross_entropy(logits, target).item() == pytest.approx(expected)


def test_binary_path_hand_computed():
    # C == 1: logits (0, ln 3) -> sigmoid p = (1/2, 3/4), target (1, 0)
    logits = torch.tensor([[[[0.0, LN3]]]], dtype=torch.float64)
    target = torch.tensor([[[1, 0]]])
    # BCE: mean of -ln(1/2) and -ln(1 - 3/4) = (ln 2 + ln 4) / 2 = 1.5 ln 2
    assert cross_entropy(logits, target).item() == pytest.approx(1.5 * math.log(2))
    # foreground Dice: 2*(1/2) / ((1/2 + 3/4) + 1) = 4/9 -> loss 5/9
    assert dice_loss(logits, target, eps=0.0).item() == pytest.approx(5 / 9)


@pytest.mark.parametrize("num_classes", [1, 3])
def test_perfect_prediction_gives_zero_dice_loss(num_classes):
    target = torch.tensor([[[0, 1], [2, 0]], [[1, 1], [0, 0]]])
    if num_classes == 1:
        target = target.clamp(max=1)
        logits = (40.0 * target - 20.0).unsqueeze(1)
    else:
        onehot = torch.nn.functional.one_hot(target, num_classes).permute(0, 3, 1, 2)
        logits = 40.0 * onehot - 20.0
    assert dice_loss(logits, target).item() == pytest.approx(0.0, abs=1e-6)


def test_dice_ce_is_sum():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4)
    target = torch.randint(0, 3, (2, 4, 4))
    expected = dice_loss(logits, target) + cross_entropy(logits, target)
    torch.testing.assert_close(dice_ce(logits, target), expected)


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("num_classes", [1, 3])
def test_batch_loss_is_mean_of_half_batches(name, num_classes):
    """Data parallelism: 2 ranks x 2 samples must match 1 rank x 4 samples, gradients included."""
    torch.manual_seed(0)
    model = torch.nn.Conv2d(2, num_classes, 3, padding=1).double()
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    target = torch.randint(0, max(num_classes, 2), (4, 5, 5))
    target[:2][target[:2] == 1] = 0  # first half lacks class 1: per-sample dice is not pooled dice
    loss = get_loss(name)

    full = loss(model(x), target)
    full_grad = torch.autograd.grad(full, list(model.parameters()))
    halves = [loss(model(x[i : i + 2]), target[i : i + 2]) for i in (0, 2)]
    half_grads = [torch.autograd.grad(h, list(model.parameters())) for h in halves]

    torch.testing.assert_close(full, (halves[0] + halves[1]) / 2)
    for g, g0, g1 in zip(full_grad, *half_grads):
        torch.testing.assert_close(g, (g0 + g1) / 2)


def test_get_loss():
    assert get_loss("ce") is cross_entropy
    assert get_loss("cross_entropy") is cross_entropy
    assert get_loss("dice") is dice_loss
    assert get_loss("dice_ce") is dice_ce
    with pytest.raises(ValueError, match=r"unknown loss 'focal'.*'ce'.*'dice_ce'"):
        get_loss("focal")


def test_shape_mismatch():
    with pytest.raises(ValueError, match="target"):
        dice_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 5, dtype=torch.long))


def test_a_class_absent_from_a_slice_adds_no_dice_term():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8)
    target = torch.randint(0, 2, (2, 8, 8))  # class 2 is in neither slice
    target[1] = 0  # and the second slice holds only the background
    p = torch.softmax(logits, dim=1)
    expected = []
    for i in range(2):
        present = [c for c in range(3) if (target[i] == c).any()]
        dices = [(2 * (p[i, c] * (target[i] == c)).sum() + 1e-6) / (p[i, c].sum() + (target[i] == c).sum() + 1e-6)
                 for c in present]
        expected.append(sum(dices) / len(dices))
    assert dice_loss(logits, target).item() == pytest.approx(1 - sum(expected).item() / 2, rel=1e-6)
    # predicting the absent class is still penalised by the cross-entropy of dice_ce
    shifted = logits.clone()
    shifted[:, 2] += 3.0
    assert dice_ce(shifted, target) > dice_ce(logits, target)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_take_volumes(name):
    """3D logits [N, C, D, H, W]: the loss of a volume is the loss of its voxels laid out as one 2D image."""
    torch.manual_seed(0)
    logits, target = torch.randn(2, 3, 4, 5, 6), torch.randint(0, 3, (2, 4, 5, 6))
    flat = get_loss(name)(logits.reshape(2, 3, 20, 6), target.reshape(2, 20, 6))
    torch.testing.assert_close(get_loss(name)(logits, target), flat)


def test_deep_supervision_weights_halve_per_level_against_downsampled_labels():
    from autocnnp.components.tasks.imaging_segmentation import SegmentationTask
    from autocnnp.training.losses import deep_supervision_weights

    assert deep_supervision_weights(3) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    torch.manual_seed(0)
    target = torch.randint(0, 3, (2, 8, 8, 4))
    outputs = (torch.randn(2, 3, 8, 8, 4), torch.randn(2, 3, 4, 4, 2), torch.randn(2, 3, 2, 2, 1))
    loss = SegmentationTask().loss("dice_ce")
    expected = sum(w * dice_ce(o, target[:, ::s, ::s, ::s]) for w, o, s in zip([4 / 7, 2 / 7, 1 / 7], outputs, (1, 2, 4)))
    torch.testing.assert_close(loss(outputs, target), expected)
    torch.testing.assert_close(loss(outputs[0], target), dice_ce(outputs[0], target))  # a plain network's logits
