"""The names of what a run reports, shared by training, monitoring, repeats, tuning and evaluation."""

# The five SegEval metrics of the thesis (training/metrics.py computes them from a confusion matrix).
SEGEVAL = ("dice", "pixel_accuracy", "mean_accuracy", "mean_iou", "fw_iou")
# Per-epoch losses of metrics.csv.
LOSSES = ("train_loss", "valid_loss")
