"""Engine overhead: how long `autocnnp validate` takes, as a process and in-process.

    python benchmarks/engine_overhead.py [--runs 20] [--iterations 200] [JOB]

(1) whole-process ``python -m autocnnp validate JOB`` wall time (median of --runs), target < 150 ms,
    with a bytecode cache as an installed package has one (PYTHONPYCACHEPREFIX in a temporary folder,
    so the checkout stays clean); also without one (PYTHONDONTWRITEBYTECODE=1: every module compiled
    from source at every start, as in some containers);
(2) ``python -c pass`` median in the same run, and the ratio (1)/(2): the interpreter's own start-up;
(3) in-process parse + schema validation + assembly (``autocnnp.generator.assemble.assemble``):
    the cold first call (first-time imports included), then the median of --iterations warm calls,
    target < 10 ms. Exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
TARGET_PROCESS_MS = 150.0
TARGET_INPROCESS_MS = 10.0


def _median_ms(cmd: list[str], runs: int, env: dict[str, str]) -> tuple[float, float, float]:
    """(median, min, max) wall time in ms of ``runs`` runs of ``cmd`` (one untimed warm-up run first)."""
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)  # file cache, bytecode cache
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times), max(times)


def _envs(pycache: str) -> tuple[dict[str, str], dict[str, str]]:
    """Child environments with and without a bytecode cache (no launcher variables)."""
    drop = ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI_", "SLURM_")) and k not in drop}
    return {**base, "PYTHONPYCACHEPREFIX": pycache}, {**base, "PYTHONDONTWRITEBYTECODE": "1"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("job", nargs="?", default="xml_configs/demo.xml")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--python", default=str(VENV_PYTHON if VENV_PYTHON.exists() else sys.executable))
    args = ap.parse_args(argv)
    job = (ROOT / args.job).resolve()

    # (3) first, while nothing of autocnnp is imported in this process: the cold call includes the imports.
    start = time.perf_counter()
    from autocnnp.engine.job import read_job
    from autocnnp.run.job import load_job

    load_job(job)
    cold_ms = (time.perf_counter() - start) * 1e3
    warm, parse = [], []
    for _ in range(args.iterations):
        t0 = time.perf_counter()
        read_job(job)
        t1 = time.perf_counter()
        load_job(job)
        t2 = time.perf_counter()
        parse.append((t1 - t0) * 1e3)
        warm.append((t2 - t1) * 1e3)
    warm_ms, parse_ms = statistics.median(warm), statistics.median(parse)

    # (1) and (2)
    pycache = tempfile.mkdtemp(prefix="autocnnp-pyc-")
    try:
        cached, uncached = _envs(pycache)
        validate_cmd = [args.python, "-m", "autocnnp", "validate", str(job)]
        validate = _median_ms(validate_cmd, args.runs, cached)
        bare = _median_ms([args.python, "-c", "pass"], args.runs, cached)
        validate_src = _median_ms(validate_cmd, args.runs, uncached)
    finally:
        shutil.rmtree(pycache, ignore_errors=True)

    ok_process = validate[0] < TARGET_PROCESS_MS
    ok_inprocess = warm_ms < TARGET_INPROCESS_MS
    rows = [
        ("(1) `autocnnp validate` process", f"{validate[0]:8.1f}", f"{validate[1]:.1f}-{validate[2]:.1f}",
         f"< {TARGET_PROCESS_MS:.0f}", "ok" if ok_process else "MISSED"),
        ("    same, no bytecode cache", f"{validate_src[0]:8.1f}", f"{validate_src[1]:.1f}-{validate_src[2]:.1f}",
         "", ""),
        ("(2) `python -c pass` process", f"{bare[0]:8.1f}", f"{bare[1]:.1f}-{bare[2]:.1f}", "", ""),
        ("    ratio (1)/(2)", f"{validate[0] / bare[0]:7.2f}x", "", "", ""),
        ("    engine share (1)-(2)", f"{validate[0] - bare[0]:8.1f}", "", "", ""),
        ("(3) assemble(), cold first call", f"{cold_ms:8.1f}", "", "",
         "(no bytecode cache here)" if sys.dont_write_bytecode else ""),
        ("(3) assemble(), warm median", f"{warm_ms:8.2f}", f"{min(warm):.2f}-{max(warm):.2f}",
         f"< {TARGET_INPROCESS_MS:.0f}", "ok" if ok_inprocess else "MISSED"),
        ("    of which read_job() (parse+XSD)", f"{parse_ms:8.2f}", f"{min(parse):.2f}-{max(parse):.2f}", "", ""),
    ]
    print(f"engine overhead: {job.relative_to(ROOT) if job.is_relative_to(ROOT) else job}; python {args.python}; "
          f"{args.runs} process runs, {args.iterations} in-process iterations")
    head = ("measure", "median ms", "min-max ms", "target", "")
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(5)]
    for r in (head, tuple("-" * w for w in widths), *rows):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
    return 0 if ok_process and ok_inprocess else 1


if __name__ == "__main__":
    sys.exit(main())
