"""Tests for the SegEval metrics."""

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from autocnnp.core.metrics import SEGEVAL
from autocnnp.training.metrics import (
    BRATS_REGIONS,
    SegEval,
    class_scores,
    confusion_matrix,
    foreground_dice,
    region_dice,
    segmentation_metrics,
)

# 2 classes: t = (4, 6), column sums (5, 5), diagonal (3, 4), total 10
CONF_2 = [[3, 1], [2, 4]]
EXPECTED_2 = {
    "dice": (6 / 9 + 8 / 11) / 2,  # 2*3/(6+1+2), 2*4/(8+2+1) -> 23/33
    "pixel_accuracy": 7 / 10,
    "mean_accuracy": (3 / 4 + 4 / 6) / 2,  # 17/24
    "mean_iou": (3 / 6 + 4 / 7) / 2,  # 3/(4+5-3), 4/(6+5-4) -> 15/28
    "fw_iou": (4 * 3 / 6 + 6 * 4 / 7) / 10,  # 19/35
}


def assert_metrics(conf, expected):
    result = segmentation_metrics(conf)
    assert set(result) == set(SEGEVAL)
    for name, value in expected.items():
        assert result[name] == pytest.approx(value), name


@pytest.mark.parametrize("as_tensor", [False, True])
def test_two_classes(as_tensor):
    conf = torch.tensor(CONF_2) if as_tensor else np.array(CONF_2)
    assert_metrics(conf, EXPECTED_2)


def test_three_classes():
    # t = (3, 4, 3), column sums (4, 4, 2), diagonal (2, 3, 1), total 10
    conf = [[2, 1, 0], [0, 3, 1], [2, 0, 1]]
    assert_metrics(
        np.array(conf),
        {
            "dice": (4 / 7 + 6 / 8 + 2 / 5) / 3,  # 241/420
            "pixel_accuracy": 6 / 10,
            "mean_accuracy": (2 / 3 + 3 / 4 + 1 / 3) / 3,  # 7/12
            "mean_iou": (2 / 5 + 3 / 5 + 1 / 4) / 3,  # 2/(3+4-2), 3/(4+4-3), 1/(3+2-1) -> 5/12
            "fw_iou": (3 * 2 / 5 + 4 * 3 / 5 + 3 * 1 / 4) / 10,  # 87/200
        },
    )


def test_binary_from_single_channel_logits():
    # sigmoid > 0.5 <=> logit > 0: pred = (1, 0, 0, 0), target = (1, 1, 0, 0)
    # conf = [[2, 0], [1, 1]]: t = (2, 2), column sums (3, 1)
    logits = torch.tensor([2.0, -1.0, -3.0, -0.1]).reshape(1, 1, 1, 4)
    target = torch.tensor([1, 1, 0, 0]).reshape(1, 1, 4)
    seg = SegEval(2)
    seg.update(logits, target)
    assert seg.confusion.tolist() == [[2, 0], [1, 1]]
    result = seg.compute()
    assert result["dice"] == pytest.approx((4 / 5 + 2 / 3) / 2)
    assert result["pixel_accuracy"] == pytest.approx(3 / 4)
    assert result["mean_accuracy"] == pytest.approx((1 + 1 / 2) / 2)
    assert result["mean_iou"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert result["fw_iou"] == pytest.approx((2 * 2 / 3 + 2 * 1 / 2) / 4)


def test_class_absent_everywhere_is_left_out():
    # class 2 is neither true nor predicted: same scores as the 2-class matrix
    conf = np.zeros((3, 3), dtype=np.int64)
    conf[:2, :2] = CONF_2
    assert_metrics(conf, EXPECTED_2)


def test_class_only_predicted_counts_except_for_accuracy():
    # class 2 predicted once but never true: t = (3, 2, 0), column sums (2, 2, 1)
    conf = np.array([[2, 0, 1], [0, 2, 0], [0, 0, 0]])
    assert_metrics(
        conf,
        {
            "dice": (4 / 5 + 4 / 4 + 0) / 3,
            "pixel_accuracy": 4 / 5,
            "mean_accuracy": (2 / 3 + 2 / 2) / 2,  # t_2 = 0: left out
            "mean_iou": (2 / 3 + 2 / 2 + 0) / 3,
            "fw_iou": (3 * 2 / 3 + 2 * 1 + 0) / 5,
        },
    )


def test_empty_confusion_matrix():
    with pytest.raises(ValueError, match="empty"):
        segmentation_metrics(np.zeros((2, 2)))


def test_confusion_matrix_matches_loop():
    gen = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 4, (3, 5, 6), generator=gen)
    target = torch.randint(0, 4, (3, 5, 6), generator=gen)
    expected = torch.zeros(4, 4, dtype=torch.int64)
    for t, p in zip(target.flatten().tolist(), pred.flatten().tolist()):
        expected[t, p] += 1
    conf = confusion_matrix(pred, target, 4)
    assert conf.dtype == torch.int64
    assert torch.equal(conf, expected)


@pytest.mark.parametrize("bad", [3, -1])
def test_out_of_range_target(bad):
    target = torch.tensor([[0, 1, bad]])
    with pytest.raises(ValueError, match=f"target value {bad} is outside"):
        confusion_matrix(torch.zeros_like(target), target, 3)


def test_out_of_range_pred():
    with pytest.raises(ValueError, match="pred value 7"):
        confusion_matrix(torch.tensor([0, 7]), torch.tensor([0, 1]), 3)


def random_batches(seed: int, n: int = 2):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(2, 3, 4, 4, generator=gen), torch.randint(0, 3, (2, 4, 4), generator=gen))
        for _ in range(n)
    ]


def test_segeval_two_batches_equal_one_concatenated():
    (l1, t1), (l2, t2) = random_batches(0)
    split = SegEval(3)
    split.update(l1, t1)
    split.update(l2, t2)
    joined = SegEval(3)
    joined.update(torch.cat([l1, l2]), torch.cat([t1, t2]))
    assert torch.equal(split.confusion, joined.confusion)
    assert split.confusion.sum() == 64
    assert split.compute() == joined.compute()


def test_segeval_integer_predictions_and_reset():
    seg = SegEval(3)
    seg.update(torch.tensor([[0, 2]]), torch.tensor([[0, 1]]))
    assert seg.confusion.tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 0]]
    seg.reset()
    assert seg.confusion.sum() == 0


def test_all_reduce_without_distributed_is_noop():
    seg = SegEval(2)
    seg.update(torch.tensor([[0, 1, 1]]), torch.tensor([[0, 1, 0]]))
    before = seg.confusion
    seg.all_reduce(None)
    assert torch.equal(seg.confusion, before)


def _rank_confusion(rank: int, world_size: int, init_file: str, results) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    logits, target = random_batches(0)[rank]
    seg = SegEval(3)
    seg.update(logits, target)

    def reduce(t):
        dist.all_reduce(t)
        return t

    seg.all_reduce(reduce)
    results[rank] = seg.confusion
    dist.destroy_process_group()


@pytest.mark.ranks
def test_all_reduce_sums_over_ranks(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_rank_confusion, args=(2, str(tmp_path / "init"), results), nprocs=2)
    joined = SegEval(3)
    for logits, target in random_batches(0):
        joined.update(logits, target)
    assert torch.equal(results[0], joined.confusion)
    assert torch.equal(results[1], joined.confusion)


# --- per-class and region scores -------------------------------------------------------------

# 3 classes: t = (3, 4, 3), column sums p = (4, 4, 2), diagonal (2, 3, 1)
CONF_3 = [[2, 1, 0], [0, 3, 1], [2, 0, 1]]


@pytest.mark.parametrize("as_tensor", [False, True])
def test_class_scores_by_hand(as_tensor):
    conf = torch.tensor(CONF_3) if as_tensor else np.array(CONF_3)
    scores = class_scores(conf)
    assert set(scores) == {"dice", "iou"}
    assert scores["dice"].dtype == np.float64 and scores["dice"].shape == (3,)
    np.testing.assert_allclose(scores["dice"], [4 / 7, 6 / 8, 2 / 5])  # 2 n_ii / (t_i + p_i)
    np.testing.assert_allclose(scores["iou"], [2 / 5, 3 / 5, 1 / 4])  # n_ii / (t_i + p_i - n_ii)


def test_class_scores_absent_class_is_nan():
    conf = np.zeros((4, 4), dtype=np.int64)
    conf[:2, :2] = CONF_2
    conf[0, 3] = 1  # class 3 only predicted: present, score 0
    scores = class_scores(conf)
    np.testing.assert_allclose(scores["dice"], [6 / 10, 8 / 11, np.nan, 0.0])  # t = (5, 6), p = (5, 5, 0, 1)
    np.testing.assert_allclose(scores["iou"], [3 / 7, 4 / 7, np.nan, 0.0])


def test_class_scores_not_square():
    with pytest.raises(ValueError, match="square"):
        class_scores(np.zeros((2, 3)))


def test_foreground_dice_by_hand():
    assert foreground_dice(np.array(CONF_3)) == pytest.approx((6 / 8 + 2 / 5) / 2)
    conf = np.zeros((4, 4), dtype=np.int64)
    conf[:2, :2] = CONF_2  # classes 2 and 3 absent: left out
    assert foreground_dice(torch.tensor(conf)) == pytest.approx(8 / 11)
    conf[0, 3] = 1  # class 3 falsely predicted: counts with Dice 0
    assert foreground_dice(conf) == pytest.approx((8 / 11 + 0) / 2)


def test_foreground_dice_no_foreground_anywhere_is_one():
    assert foreground_dice(np.array([[7, 0, 0], [0, 0, 0], [0, 0, 0]])) == 1.0


def test_foreground_dice_only_in_truth_is_zero():
    assert foreground_dice(np.array([[7, 0], [3, 0]])) == 0.0


# 4 classes, rows = truth, columns = prediction
CONF_4 = [[5, 1, 0, 0], [1, 3, 1, 0], [0, 1, 2, 1], [0, 0, 1, 4]]


@pytest.mark.parametrize("as_tensor", [False, True])
def test_region_dice_brats_by_hand(as_tensor):
    conf = torch.tensor(CONF_4) if as_tensor else np.array(CONF_4)
    assert region_dice(conf, BRATS_REGIONS) == pytest.approx(
        {
            "whole_tumour": 26 / 28,  # TP = 4 + 4 + 5 = 13, FP = row 0 cols 1-3 = 1, FN = rows 1-3 col 0 = 1
            "tumour_core": 16 / 18,  # TP = 2 + 1 + 1 + 4 = 8, FP = rows 0-1 cols 2-3 = 1, FN = rows 2-3 cols 0-1 = 1
            "enhancing_tumour": 8 / 10,  # TP = 4, FP = col 3 rows 0-2 = 1, FN = row 3 cols 0-2 = 1
        }
    )


def test_region_of_one_class_is_its_dice():
    dice = class_scores(np.array(CONF_4))["dice"]
    result = region_dice(np.array(CONF_4), {f"c{c}": (c,) for c in range(4)})
    assert list(result.values()) == pytest.approx(list(dice))


def test_region_dice_empty_region_is_one():
    conf = np.zeros((4, 4), dtype=np.int64)
    conf[:2, :2] = CONF_2  # no label 2 or 3 in truth nor prediction
    result = region_dice(conf, BRATS_REGIONS)
    assert result["whole_tumour"] == pytest.approx(8 / 11)
    assert result["tumour_core"] == 1.0
    assert result["enhancing_tumour"] == 1.0


@pytest.mark.parametrize(("values", "bad"), [((1, 4), "4"), ((-1, 2, 7), "-1, 7"), ((1.0,), "1.0")])
def test_region_dice_bad_class_value(values, bad):
    with pytest.raises(ValueError, match=rf"region 'tumour': class values \[{bad}\] are outside \[0, 4\)"):
        region_dice(np.array(CONF_4), {"whole": (1, 2), "tumour": values})


def brute_dice(pred_mask: np.ndarray, true_mask: np.ndarray) -> float:
    size = pred_mask.sum() + true_mask.sum()
    return 2 * (pred_mask & true_mask).sum() / size if size else np.nan


@pytest.mark.parametrize("seed", range(6))
def test_scores_match_brute_force_on_label_maps(seed):
    rng = np.random.default_rng(seed)
    num_classes = 5
    # labels drawn below num_classes - 1: the last class is always absent
    truth = rng.integers(0, rng.integers(2, num_classes), size=(4, 7, 9))
    pred = np.where(rng.random(truth.shape) < 0.6, truth, rng.integers(0, num_classes - 1, size=truth.shape))
    conf = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(truth), num_classes)

    scores = class_scores(conf)
    for c in range(num_classes):
        p, t = pred == c, truth == c
        union = (p | t).sum()
        np.testing.assert_allclose(scores["dice"][c], brute_dice(p, t), rtol=1e-12)
        np.testing.assert_allclose(scores["iou"][c], (p & t).sum() / union if union else np.nan, rtol=1e-12)
    assert np.isnan(scores["dice"][-1]) and np.isnan(scores["iou"][-1])

    present = [brute_dice(pred == c, truth == c) for c in range(1, num_classes) if ((pred == c) | (truth == c)).any()]
    assert foreground_dice(conf) == pytest.approx(np.mean(present) if present else 1.0, rel=1e-12)

    regions = {**BRATS_REGIONS, "odd": (1, 3), "background": (0,), "everything": range(num_classes)}
    for name, region in region_dice(conf, regions).items():
        p, t = np.isin(pred, list(regions[name])), np.isin(truth, list(regions[name]))
        expected = brute_dice(p, t)
        assert region == pytest.approx(1.0 if np.isnan(expected) else expected, rel=1e-12), name
