"""The Python API on the demo job: load it with overrides, validate, plan, train and read the results.

    python examples/api_example.py [OUTPUT_FOLDER]

A tiny variant (32 training slices, 1 epoch, 2 ranks on the CPU) trains in seconds into OUTPUT_FOLDER
(default: a temporary folder, removed at the end).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import autocnnp

DEMO = Path(__file__).resolve().parents[1] / "xml_configs" / "demo.xml"
TINY = {"parallelism-degree": 2, "hyperparameters.end_epoch": 1, "data.train_samples": 32, "data.valid_samples": 8}


def main(output: Path) -> int:
    job = autocnnp.load(DEMO, {**TINY, "output": output})
    valid = autocnnp.validate(job)
    print(f"valid: {valid.task}, {valid.world_size} ranks, {valid.strategy}, {valid.architecture}")
    plan = autocnnp.plan(job)
    print(f"command: {' '.join(plan.command)}")
    result = autocnnp.train(job)
    print(f"exit code: {result.exit_code} ({result.outcome})")
    print(f"run folder: {result.run_dir}")
    for name in ("epoch", "train_loss", "valid_loss", "dice_fg", "mean_iou"):
        print(f"{name}: {result.metrics[name]:.4g}")
    return result.exit_code


if __name__ == "__main__":
    if len(sys.argv) > 1:
        sys.exit(main(Path(sys.argv[1])))
    with tempfile.TemporaryDirectory(prefix="autocnnp-api-") as tmp:
        sys.exit(main(Path(tmp) / "run"))
