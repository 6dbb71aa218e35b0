"""benchmarks/gpu_suite.sh: every part's code path runs (``--cpu-dry-run``: on the CPU, tiny sizes), so the suite
works the day a GPU runs it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from jobfiles import run_in_group

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.ranks
@pytest.mark.slow
def test_the_gpu_suite_runs_every_part_on_the_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "LOGS": str(tmp_path)}
    rc, out, err = run_in_group(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--cpu-dry-run"], 900, env=env)
    assert rc == 0, out + err
    for line in ("ratio framework / hand:", "lowest ratio: batched", "best ms per slice / 5 ms goal:",
                 "x4, cpu bf16", "s per volume bf16 / fp32:", "framework / hand-written:", "tensorflow / torch samples/s:",
                 "busbw / link bound: skipped"):
        assert line in out, (line, out)
