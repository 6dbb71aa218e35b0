"""The names of what a run reports, shared by training, monitoring, repeats, tuning and evaluation."""

from __future__ import annotations

import re

# The five SegEval metrics of the thesis (training/metrics.py computes them from a confusion matrix).
SEGEVAL = ("dice", "pixel_accuracy", "mean_accuracy", "mean_iou", "fw_iou")
DICE, PIXEL_ACCURACY, MEAN_ACCURACY, MEAN_IOU, FW_IOU = SEGEVAL
# The mean Dice of the foreground classes: what a user reports (the SegEval Dice counts the background).
FOREGROUND_DICE = "dice_fg"
# Per-epoch losses of metrics.csv, and the learning rate of each epoch's last step.
LOSSES = ("train_loss", "valid_loss")
TRAIN_LOSS, VALID_LOSS = LOSSES
LEARNING_RATE = "lr"
# How the tuning guideline ranks two runs (thesis 6.3.3): Dice, then mean accuracy, then mean IoU.
GUIDELINE_PRIORITY = (DICE, MEAN_ACCURACY, MEAN_IOU)


def class_key(name: str) -> str:
    """A class or region name as it appears in metric names (``dice/<key>``): lower case, no spaces."""
    return re.sub(r"[^\w.-]+", "_", str(name).strip().lower()).strip("_") or "unnamed"


def class_metric(family: str, name: str) -> str:
    """``dice/edema``, ``iou/edema``, ``region_dice/whole_tumour``: one value per class or region."""
    return f"{family}/{class_key(name)}"


# The nested regions of the brain-tumour task (Decathlon Task01 labels 1 edema, 2 non-enhancing tumour,
# 3 enhancing tumour), as BraTS and nnU-Net score them.
BRATS_REGIONS = {"whole_tumour": (1, 2, 3), "tumour_core": (2, 3), "enhancing_tumour": (3,)}


def parse_regions(text: str, class_names: tuple[str, ...] = ()) -> dict[str, tuple[int, ...]]:
    """Groups of classes scored as one region: ``auto`` (the BraTS regions when the classes are the
    brain-tumour labels, else none), ``none``, or ``name=1,2,3; name=2,3``. Raises ValueError."""
    text = str(text).strip()
    if text.lower() in ("", "none"):
        return {}
    if text.lower() == "auto":
        names = " ".join(class_names[1:4]).lower()
        brats = len(class_names) == 4 and "edema" in names and "enhancing" in names
        return dict(BRATS_REGIONS) if brats else {}
    regions: dict[str, tuple[int, ...]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, sep, values = part.partition("=")
        try:
            classes = tuple(int(v) for v in values.split(",") if v.strip())
        except ValueError:
            classes = ()
        if not sep or not name.strip() or not classes or min(classes) < 1:
            raise ValueError(f"region '{part}' is not NAME=CLASS,CLASS,... with foreground class values (1 or more)")
        regions[class_key(name)] = classes
    return regions
