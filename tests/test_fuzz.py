"""Fuzzing the engine: 1,200 jobs mutated from xml_configs/ (fixed seed) through `validate` and `plan`.

Every mutant must end with exit code 0 (still a valid job) or 2 with one line naming the job file,
never with a traceback or another exit code.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "xml_configs").glob("*.xml"))
MUTANTS = 1200
ODD_VALUES = ["", " ", "0", "-1", "1_0", "\uff12", "1e309", "nan", "-inf", "1000000000", "9" * 40, "0x10", "true",
              "None", "é", "\x00", "../../../../etc/passwd", "/dev/zero", "/", "a" * 5000, "${HOME}", "&amp;", "]]>",
              "<", "2.5", "1,5", "ring_allreduce", "mpi4py", "grescale", "horovod", "decathlon", "fcn", "sgd"]


def _texts(text: str) -> list[re.Match]:
    return list(re.finditer(r">([^<>]*)<", text))


def mutate(text: str, rng: random.Random) -> bytes:
    """One to three random edits: values, attributes, elements, bytes, the encoding."""
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(8)
        if not re.search(r"<(\w[\w-]*)[^>]*>[^<]*</\1>", text):  # cut to nothing to edit
            break
        if kind <= 1:  # an element's text
            m = rng.choice(_texts(text))
            text = text[:m.start(1)] + rng.choice(ODD_VALUES) + text[m.end(1):]
        elif kind == 2:  # an attribute's value
            attrs = list(re.finditer(r'="([^"]*)"', text))
            m = rng.choice(attrs)
            text = text[:m.start(1)] + rng.choice(ODD_VALUES).replace('"', "") + text[m.end(1):]
        elif kind == 3:  # drop an element
            elements = list(re.finditer(r"<(\w[\w-]*)[^>]*>[^<]*</\1>", text))
            m = rng.choice(elements)
            text = text[:m.start()] + text[m.end():]
        elif kind == 4:  # repeat an element
            elements = list(re.finditer(r"<(\w[\w-]*)[^>]*>[^<]*</\1>", text))
            m = rng.choice(elements)
            text = text[:m.end()] + m.group() + text[m.end():]
        elif kind == 5:  # rename a tag
            tags = list(re.finditer(r"<(/?)([\w-]+)", text))
            m = rng.choice(tags)
            text = text[:m.start(2)] + rng.choice(["param", "property", "value", "action", "x", "module"]) + \
                text[m.end(2):]
        elif kind == 6:  # cut the file
            text = text[:rng.randrange(len(text))]
        else:  # the encoding declaration
            text = re.sub(r'encoding="[^"]*"', f'encoding="{rng.choice(["latin-1", "utf-16", "ebcdic", "x"])}"', text)
    data = text.encode("utf-8", "surrogateescape")
    if rng.random() < 0.05:  # stray bytes
        at = rng.randrange(len(data) + 1)
        data = data[:at] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 4))) + data[at:]
    return data


@pytest.fixture(scope="module")
def mutants(tmp_path_factory) -> list[Path]:
    rng = random.Random(20261129)
    folder = tmp_path_factory.mktemp("fuzz")
    paths = []
    for i in range(MUTANTS):
        source = SOURCES[i % len(SOURCES)]
        path = folder / f"m{i:04d}.xml"
        path.write_bytes(mutate(source.read_text(), rng))
        paths.append(path)
    return paths


@pytest.mark.slow
@pytest.mark.parametrize("command", ["validate", "plan"])
def test_no_mutant_lets_a_traceback_escape(cli, mutants, command):
    outcomes = {0: 0, 2: 0}
    for path in mutants:
        try:
            rc, out, err = cli(command, path)
        except BaseException as exc:  # noqa: BLE001 - the point: nothing may escape
            pytest.fail(f"{command} {path} raised {type(exc).__name__}: {str(exc)[:300]}")
        assert rc in outcomes, (path, rc, err)
        if rc == 2:
            assert err.startswith("autocnnp: ") and err.count("\n") == 1 and "Traceback" not in err, (path, err)
        outcomes[rc] += 1
    assert outcomes[2] > MUTANTS // 2 and outcomes[0] > 0, outcomes  # the mutations bite, and not all of them
