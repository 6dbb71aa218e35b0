"""benchmarks/gpu_suite.sh: every part's code path runs (``--cpu-dry-run``: on the CPU, tiny sizes), so the suite
works the day a GPU runs it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.ranks
@pytest.mark.slow
def test_the_gpu_suite_runs_every_part_on_the_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "LOGS": str(tmp_path)}
    proc = subprocess.Popen(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--cpu-dry-run"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out
    for line in ("ratio framework / hand:", "lowest ratio: batched", "best ms per slice / 5 ms goal:",
                 "skipped: 3D sliding-window", "framework / hand-written:", "tensorflow / torch samples/s:",
                 "busbw / link bound: skipped"):
        assert line in out, (line, out)
