"""`autocnnp validate` as a whole process for every example job, against `python -c pass` in the same run.

    python benchmarks/validate_speed.py [--runs 30] [JOB ...]   (default: every xml_configs/*.xml)

The two commands alternate, each run ``--runs`` times; minima are reported (the machine may be busy:
the minimum is the least disturbed run), with the median beside them. Bytecode caches are written and
used as on a user's machine (PYTHONDONTWRITEBYTECODE is dropped; the caches go to a temporary
PYTHONPYCACHEPREFIX so the checkout stays clean). A job that fails validation (e.g. its dataset is not
on this machine) is timed all the same: its exit code is shown. Per job: validate's time, `python -c
pass`'s, the ratio, and whether validate imported torch or tensorflow (checked in one extra run).
Target: at most 150 ms; exits 1 when a job misses it or imports either framework. ``--source`` (repeated)
times other checkouts in the same rounds: ``--source /tmp/before --source .`` gives before/after side by side.
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
    ap.add_argument("--source", type=Path, action="append",
                    help="a folder holding the autocnnp package to time (default this checkout); repeat it to "
                         "compare checkouts (before/after), alternated in the same rounds")
    ap.add_argument("--python", default=str(VENV_PYTHON if VENV_PYTHON.exists() else sys.executable))
    args = ap.parse_args(argv)
    jobs = [j.resolve() for j in args.jobs] or sorted((ROOT / "xml_configs").glob("*.xml"))
    sources = [s.resolve() for s in args.source or [ROOT]]
    pycache = tempfile.mkdtemp(prefix="autocnnp-pyc-")
    base = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    envs = [{**base, "PYTHONPYCACHEPREFIX": pycache, "PYTHONPATH": str(source)} for source in sources]
    load = os.getloadavg()
    print(f"validate speed: python {args.python}; {args.runs} alternated runs each; "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"{'job':34} {'source':24} {'rc':>3} {'validate ms':>16} {'pass ms':>16} {'ratio':>6}  imported  target")
    ok = True
    try:
        bare_cmd = [args.python, "-c", "pass"]
        for job in jobs:
            validate_cmd = [args.python, "-m", "autocnnp", "validate", str(job)]
            for env in envs:  # warm-up: file cache, bytecode caches
                _time_ms(validate_cmd, env), _time_ms(bare_cmd, env)
            validate, bare, rcs = [[] for _ in envs], [[] for _ in envs], [0] * len(envs)
            for _ in range(args.runs):
                for i, env in enumerate(envs):
                    ms, rcs[i] = _time_ms(validate_cmd, env)
                    validate[i].append(ms)
                    bare[i].append(_time_ms(bare_cmd, env)[0])
            name = job.relative_to(ROOT) if job.is_relative_to(ROOT) else job
            for source, env, times, bare_times, rc in zip(sources, envs, validate, bare, rcs):
                imported = _imported(args.python, job, env)
                met = min(times) <= TARGET_MS and imported == "none"
                ok &= met
                print(f"{str(name):34} {str(source)[-24:]:24} {rc:3d} {min(times):7.1f} (med {statistics.median(times):5.0f})"
                      f" {min(bare_times):7.1f} (med {statistics.median(bare_times):5.0f})"
                      f" {min(times) / min(bare_times):5.2f}x  {imported:9} {'ok' if met else 'MISSED'}")
    finally:
        shutil.rmtree(pycache, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
