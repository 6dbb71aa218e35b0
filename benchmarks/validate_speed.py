"""`autocnnp validate` as a whole process for every example job, against `python -c pass` in the same run.

    python benchmarks/validate_speed.py [--runs 30] [JOB ...]   (default: every xml_configs/*.xml)

The two commands alternate, each run ``--runs`` times; minima are reported (the machine may be busy:
the minimum is the least disturbed run), with the median beside them. Bytecode caches are written and
used as on a user's machine (PYTHONDONTWRITEBYTECODE is dropped; the caches go to a temporary
PYTHONPYCACHEPREFIX so the checkout stays clean). A job that fails validation (e.g. its dataset is not
on this machine) is timed all the same: its exit code is shown. Per job: validate's time, `python -c
pass`'s, the ratio, and whether validate imported torch or tensorflow (checked in one extra run).
Target: at most 150 ms; exits 1 when a job misses it or imports either framework.
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
TARGET_MS = 150.0
# run in the validated process at exit: which of the heavy frameworks did it import?
PROBE = ("import atexit, runpy, sys\n"
         "atexit.register(lambda: print('imported:', ','.join(m for m in ('torch', 'tensorflow') if m in sys.modules)"
         " or 'none', file=sys.stderr))\n"
         "sys.argv = ['autocnnp', 'validate', sys.argv[1]]\n"
         "runpy.run_module('autocnnp', run_name='__main__')\n")


def _time_ms(cmd: list[str], env: dict[str, str]) -> tuple[float, int]:
    start = time.perf_counter()
    rc = subprocess.run(cmd, cwd=env["PYTHONPATH"], env=env, capture_output=True).returncode
    return (time.perf_counter() - start) * 1e3, rc


def _imported(python: str, job: Path, env: dict[str, str]) -> str:
    err = subprocess.run([python, "-c", PROBE, str(job)], cwd=env["PYTHONPATH"], env=env, capture_output=True, text=True).stderr
    return next((line.split(":", 1)[1].strip() for line in err.splitlines() if line.startswith("imported:")), "?")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("jobs", nargs="*", type=Path)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--source", type=Path, default=ROOT,
                    help="the folder holding the autocnnp package to time (another checkout: before/after)")
    ap.add_argument("--python", default=str(VENV_PYTHON if VENV_PYTHON.exists() else sys.executable))
    args = ap.parse_args(argv)
    jobs = [j.resolve() for j in args.jobs] or sorted((ROOT / "xml_configs").glob("*.xml"))
    pycache = tempfile.mkdtemp(prefix="autocnnp-pyc-")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(PYTHONPYCACHEPREFIX=pycache, PYTHONPATH=str(args.source.resolve()))
    load = os.getloadavg()
    print(f"validate speed: {args.source.resolve()}; python {args.python}; {args.runs} alternated runs each; "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"{'job':28} {'rc':>3} {'validate ms':>16} {'pass ms':>16} {'ratio':>6}  imported   target")
    ok = True
    try:
        bare_cmd = [args.python, "-c", "pass"]
        for job in jobs:
            validate_cmd = [args.python, "-m", "autocnnp", "validate", str(job)]
            _time_ms(validate_cmd, env), _time_ms(bare_cmd, env)  # warm-up: file cache, bytecode caches
            validate, bare, rc = [], [], 0
            for _ in range(args.runs):
                ms, rc = _time_ms(validate_cmd, env)
                validate.append(ms)
                bare.append(_time_ms(bare_cmd, env)[0])
            imported = _imported(args.python, job, env)
            met = min(validate) <= TARGET_MS and imported == "none"
            ok &= met
            name = job.relative_to(ROOT) if job.is_relative_to(ROOT) else job
            print(f"{str(name):28} {rc:3d} {min(validate):7.1f} (med {statistics.median(validate):5.0f})"
                  f" {min(bare):7.1f} (med {statistics.median(bare):5.0f}) {min(validate) / min(bare):5.2f}x"
                  f"  {imported:10} {'ok' if met else 'MISSED'}")
    finally:
        shutil.rmtree(pycache, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
