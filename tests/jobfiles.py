"""Write small job files for tests (the demo job with a few fields changed)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

import pytest

DEMO = Path(__file__).resolve().parents[1] / "xml_configs" / "demo.xml"


def write_job(path: Path, *, degree: int = 2, output: str = "out", arch: str | None = None,
              actions: str | None = None, data: str | None = None, hyper: dict | None = None,
              extra: str = "", virtual: int = 1) -> Path:
    """The demo job at ``path`` with its degree (``virtual`` ranks per process), output, sections and
    hyperparameters replaced."""
    text = re.sub(r"<!--.*?-->", "", DEMO.read_text(), flags=re.S)
    attribute = f' virtual="{virtual}"' if virtual != 1 else ""
    text = re.sub(r"<parallelism-degree>\d+</parallelism-degree>",
                  f"<parallelism-degree{attribute}>{degree}</parallelism-degree>", text)
    text = re.sub(r"<output><path>[^<]*</path></output>", f"<output><path>{output}</path></output>{extra}", text)
    if arch is not None:
        text = re.sub(r"<CNN_archi.*?</CNN_archi>", arch, text, flags=re.S)
    if actions is not None:
        text = re.sub(r"<CNN-Parallelism-Generator>.*?</CNN-Parallelism-Generator>",
                      f"<CNN-Parallelism-Generator>{actions}</CNN-Parallelism-Generator>", text, flags=re.S)
    if data is not None:
        text = re.sub(r"<data .*?</data>", data, text, flags=re.S)
    for name, value in (hyper or {}).items():
        new = f'<property name="{name}">{value}</property>'
        text, n = re.subn(rf'<property name="{name}">[^<]*</property>', new, text)
        if n == 0:
            text = text.replace("</hyperparameters>", new + "</hyperparameters>")
    path.write_text(text)
    return path


# Pieces for small, fast real runs.
TINY_UNET = ('<CNN_archi name="unet"><param name="depth">2</param><param name="base_channels">4</param>'
             '<param name="norm">none</param></CNN_archi>')
QUIET = ('<monitoring><property name="tensorboard">false</property><property name="plots">false</property>'
         '<property name="progress">false</property></monitoring>')  # metrics.csv only


def synthetic_data(train_samples: int, valid_samples: int, kind: str = "atrium", size: int = 16) -> str:
    """A ``<data format="synthetic">`` section."""
    return (f'<data format="synthetic"><param name="kind">{kind}</param>'
            f'<param name="train_samples">{train_samples}</param><param name="valid_samples">{valid_samples}</param>'
            f'<param name="size">{size}</param></data>')


def checkpoint_plugin(name: str, path: str) -> str:
    """A periodic checkpoint action with the plug-in callable ``name`` from the file ``path``."""
    return ('<action class="extensible" type="checkpoint"><value>periodic</value>'
            f'<value name="{name}"><path>{path}</path></value></action>')


def strategy_module(strategy: str = "ring_allreduce", lr_policy: str = "constant", extra: str = "") -> str:
    return (f'<module name="train_strategy_def">'
            f'<action class="extensible" type="dist_strategy"><value>{strategy}</value></action>'
            f'<action class="extensible" type="lr_policy"><value>{lr_policy}</value></action>{extra}</module>')


def skip_or_fail(message: str, flag: str) -> NoReturn:
    """Skip the test, saying why; where the environment variable ``flag`` is set (CI sets it), fail instead:
    there the skip would hide a missing install."""
    if os.environ.get(flag, "") not in ("", "0"):
        pytest.fail(f"{flag} is set but {message}", pytrace=False)
    pytest.skip(message)


def require_import(module: str, make_target: str, flag: str) -> None:
    """Skip the test (or, with ``flag`` set, fail) unless ``import module`` works in a fresh interpreter."""
    probe = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    if probe.returncode != 0:
        why = (probe.stderr.strip().splitlines() or ["import failed"])[-1]
        skip_or_fail(f"{module} cannot be imported ({why}); `make {make_target}` installs it", flag)


def run_in_group(cmd: list[str], timeout: float, **popen) -> tuple[int, str, str]:
    """Run ``cmd`` in its own process group, killed with everything it started if it outlives ``timeout`` or
    the test fails: ``(exit code, stdout, stderr)`` (text)."""
    import signal

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **popen)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, out, err


def small_tubes(tmp_path_factory) -> Path:
    """A small 3D dataset (synth tubes, 1 x 1 x 3 mm) for 3D jobs."""
    from autocnnp.data.synth import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("tubes"), "tubes", cases=3, shape=(24, 24, 8), seed=1)


def data_3d(root: Path) -> str:
    """A decathlon 3D ``<data>`` section: 8 patches of 8 x 16 x 16 per epoch from 2 training cases (the volume
    caches shared by the jobs, as they are content-keyed)."""
    return (f'<data format="decathlon"><train><path>{root}</path></train><param name="dimension">3d</param>'
            f'<param name="cache">{root.parent / "cache"}</param>'
            '<param name="patch_size">8,16,16</param><param name="patches_per_volume">4</param>'
            '<param name="valid_fraction">0.34</param></data>')
