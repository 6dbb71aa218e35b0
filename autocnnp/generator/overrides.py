"""Job variants: ``KEY=VALUE`` overrides applied to a parsed job (``autocnnp run --set``, repeats, tuning).

A variant is the job file plus a few overrides; it is checked by the same engine as the file itself,
travels to the workers on their command line (``--set KEY=VALUE``) and is recorded in the run's
manifest next to the job file's text. Keys:

================================  ========================================================================
``seed``                          ``<seed>``
``output``                        ``<output><path>`` (relative paths, here and in ``data.``, are read from
                                  the job file's folder, as in the file)
``parallelism-degree``            ``<parallelism-degree>`` (also ``degree``)
``parallelism-degree.virtual``    its ``virtual`` attribute: ranks each process emulates (also ``virtual``)
``hyperparameters.NAME``          a ``<hyperparameters>`` property (likewise ``monitoring.``, ``cluster.``,
                                  ``federation.``)
``data.NAME``                     a ``<data>`` param; ``data.train``/``valid``/``test`` are paths
``architecture.NAME``             a ``<CNN_archi>`` param (also ``CNN_archi.NAME``); ``architecture.pretrained``
                                  and ``architecture.freeze`` its attributes
``ACTION``                        the implementation of an action, e.g. ``lr_policy=grescale``; choosing
                                  another implementation drops the parameters written for the old one
``ACTION.NAME``                   an action parameter, e.g. ``lr_policy.warmup_epochs=6`` (where the job names
                                  no implementation, for the one the engine chooses)
================================  ========================================================================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path

from ..core.errors import JobError, Location, Source
from ..engine.job import ActionSpec, Choice, JobSpec, Setting, read_job
from ..engine.values import convert
from .points import MODULE_BY_NAME, POINT_BY_NAME

_SECTIONS = {"hyperparameters": "hyperparameters", "monitoring": "monitoring", "cluster": "cluster",
             "federation": "federation"}
_ARCH = ("architecture", "cnn_archi")
_DATA_PATHS = ("train", "valid", "test")


def parse_sets(items: Iterable[str]) -> dict[str, str]:
    """``["a.b=1", "seed=3"]`` -> ``{"a.b": "1", "seed": "3"}`` (later items win)."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise JobError(Source(Path("--set"), text=f"--set {item}"), f"'{item}' is not KEY=VALUE",
                           "write for example --set hyperparameters.lr=1e-4")
        out[key.strip()] = value.strip()
    return out


def read_variant(file: Path | str, overrides: Mapping[str, str] | None = None) -> JobSpec:
    """Parse a job file and apply ``overrides``."""
    return apply_overrides(read_job(file), overrides or {})


def apply_overrides(spec: JobSpec, overrides: Mapping[str, str], labels: Mapping[str, str] | None = None,
                    record: bool = True) -> JobSpec:
    """A copy of ``spec`` with ``overrides`` applied; errors name ``labels[key]`` (e.g. the command-line
    option that gave it) or else ``--set KEY=VALUE``. Recorded overrides (``spec.overrides``) travel to
    the workers and into the manifest; launcher-side values (``record=False``) do not."""
    if not overrides:
        return spec
    out = dataclasses.replace(spec, actions=[dataclasses.replace(a, params=list(a.params), plugins=dict(a.plugins))
                                             for a in spec.actions],
                              hyperparameters=list(spec.hyperparameters), monitoring=list(spec.monitoring),
                              cluster=list(spec.cluster), data_params=list(spec.data_params),
                              data_paths=dict(spec.data_paths), architecture_params=list(spec.architecture_params),
                              modules=dict(spec.modules),
                              overrides={**spec.overrides, **(overrides if record else {})})
    # implementation choices first: choosing another implementation drops the old one's parameters
    items = sorted(overrides.items(), key=lambda kv: "." in kv[0])
    for key, value in items:
        where = Source(spec.file, text=(labels or {}).get(key, f"--set {key}={value}"))
        head, _, name = key.partition(".")
        low = head.lower()
        if not name and low == "seed":
            out.seed = Setting("seed", value, where)
        elif not name and low == "output":
            out.output = Setting("output", _in_job_folder(spec, value, where), where)
        elif not name and low in ("parallelism-degree", "parallelism_degree", "degree"):
            out.degree = Setting("parallelism-degree", value, where)
        elif (name.lower() == "virtual" and low in ("parallelism-degree", "parallelism_degree", "degree")) \
                or (not name and low == "virtual"):
            out.virtual = Setting("virtual", value, where)
        elif name and low in _SECTIONS:
            attr = _SECTIONS[low]
            setattr(out, attr, _put(getattr(out, attr), Setting(name, value, where)))
        elif name and low == "data":
            if name in _DATA_PATHS:
                out.data_paths[name] = Setting(name, _in_job_folder(spec, value, where), where)
            else:
                out.data_params = _put(out.data_params, Setting(name, value, where))
        elif name and low in _ARCH and name.lower() in ("pretrained", "freeze"):
            setattr(out, name.lower(), Setting(name.lower(), value, where))
        elif name and low in _ARCH:
            out.architecture_params = _put(out.architecture_params, Setting(name, value, where))
        elif low in POINT_BY_NAME:
            _override_action(out, POINT_BY_NAME[low], name, value, where)
        else:
            raise JobError(where, f"cannot override '{key}'",
                           "use seed, output, parallelism-degree, parallelism-degree.virtual, hyperparameters.NAME, "
                           "monitoring.NAME, cluster.NAME, data.NAME, architecture.NAME, an action type (lr_policy=grescale) "
                           "or ACTION.NAME (lr_policy.warmup_epochs=6)")
    return out


def _in_job_folder(spec: JobSpec, value: str, where: Location) -> str:
    """A path given on the command line, read as in the job file: relative to the job file's folder."""
    return str(convert(value, Path, where, "the path", spec.base_dir))


def _put(settings: list[Setting], new: Setting) -> list[Setting]:
    kept = [s for s in settings if s.name.lower() != new.name.lower()]
    return [*kept, new]


def _override_action(spec: JobSpec, point, name: str, value: str, where: Location) -> None:
    action = next((a for a in spec.actions if POINT_BY_NAME.get(a.type.lower()) is point), None)
    if action is None:
        module = next((m for m in spec.modules if getattr(MODULE_BY_NAME.get(m.lower()), "name", None)
                       == point.module), point.module)
        spec.modules.setdefault(module, where)
        action = ActionSpec(module=module, type=point.type, extensible=point.extensible, where=where)
        spec.actions.append(action)
    if name:
        action.params = _put(action.params, Setting(name, value, where))
        return
    current = action.choice.name if action.choice is not None else None
    if current is None or current.lower() != value.lower():
        action.params = []
    action.choice = Choice(value, None, None, where)


def degree_overrides(ranks: int, processes: int) -> dict[str, str]:
    """The overrides that train on ``ranks`` ranks with ``processes`` processes (at most ``ranks``), each
    emulating ``ranks / processes`` virtual ranks; ValueError where ``processes`` does not divide ``ranks``."""
    processes = min(processes, ranks)
    if ranks % processes:
        raise ValueError(f"{processes} processes cannot emulate {ranks} ranks: each process emulates the same "
                         "number of virtual ranks")
    return {"parallelism-degree": str(processes), "parallelism-degree.virtual": str(ranks // processes)}
