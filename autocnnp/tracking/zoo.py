"""The model zoo (R2D2's set of pretrained, pathology-specific models) on MLflow's model registry.

* ``autocnnp zoo publish RUN_DIR --name NAME`` registers the run's best checkpoint (else its latest) as a new
  version of NAME, with what reusing it needs: the checkpoint (which describes its model: architecture and
  parameters, preprocessing, classes), ``model_card.json``, the job file, ``manifest.json``, the metrics of
  the epoch that checkpoint was written at (metrics.csv) and the dataset checksum; and the run's exported forms
  (``autocnnp export``: model.onnx, model.int8.onnx and model.json) with their measured Dice per class;
* ``autocnnp zoo list``, ``autocnnp zoo show NAME[/VERSION]``, ``autocnnp zoo pull NAME[/VERSION] DIR``;
* a job starts from a zoo model with ``<CNN_archi pretrained="zoo:NAME/VERSION">`` (run & manage fetches it
  before the ranks start) and ``autocnnp predict --model zoo:NAME`` predicts with one.

The zoo is ``--zoo`` (a folder or a tracking URI), else ``$AUTOCNNP_ZOO``, else ``~/.autocnnp/zoo``: a SQLite
registry with its artifacts beside it, or a shared ``mlflow server``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import JobError, Source, shorten
from ..core.files import read_json
from ..core.metrics import DICE, FOREGROUND_DICE
from ..core.rundir import BEST_RECORD, EXPORT_CARD, ZOO_CHECKPOINT, RunDir, start_checkpoint
from ..run.manifest import epoch_metrics
from . import store_of

ZOO_ENV = "AUTOCNNP_ZOO"
EXPERIMENT = "autocnnp-zoo"


def zoo_store(arg: str | None = None) -> tuple[str, Path | None]:
    """(tracking URI, artifact folder or None) of the zoo."""
    text = arg or os.environ.get(ZOO_ENV) or str(Path.home() / ".autocnnp" / "zoo")
    uri = text if "://" in text else f"sqlite:///{Path(text).expanduser().resolve() / 'zoo.db'}"
    return store_of(Path.cwd(), uri)


def _client(store: tuple[str, Path | None]):
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise JobError(Source(Path("."), text="autocnnp zoo"), "the model zoo needs MLflow, which is not installed",
                       "install it with `make venv` (requirements/test.txt pins mlflow)") from None
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    uri, artifacts = store
    if artifacts is not None:
        artifacts.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _where(text: str) -> Source:
    return Source(Path(text), text=f"zoo model {text}")


def parse(text: str) -> tuple[str, int | None]:
    """``NAME`` or ``NAME/VERSION`` (a ``zoo:`` prefix allowed) -> (name, version or None)."""
    name, _, version = text.removeprefix("zoo:").partition("/")
    if not name or (version and not version.isdigit()):
        raise JobError(_where(text), f"'{text}' is not a zoo model", "write NAME or NAME/VERSION (autocnnp zoo list)")
    return name, int(version) if version else None


def _version(client, name: str, version: int | None):
    from mlflow.exceptions import MlflowException

    try:
        if version is not None:
            return client.get_model_version(name, str(version))
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException as exc:
        raise JobError(_where(f"{name}/{version}" if version else name), f"the zoo has no such model ({exc.message})",
                       "see `autocnnp zoo list`") from None
    if not versions:
        raise JobError(_where(name), f"the zoo has no model '{name}'", "see `autocnnp zoo list`")
    return max(versions, key=lambda v: int(v.version))


def _checkpoint_of(rundir: Path) -> Path:
    where = Source(rundir, text=shorten(rundir))
    if not rundir.is_dir():
        raise JobError(where, "the run folder does not exist" if not rundir.exists() else "this is not a folder",
                       "name the output folder of a trained run (its <output><path> in the job file)")
    found = start_checkpoint(RunDir(rundir).checkpoints)
    if found is None:
        raise JobError(where, "the run folder holds no checkpoint", "name the output folder of a trained run")
    return found


def publish(rundir: Path, name: str, store, description: str = "") -> int:
    """Register the run's best (else latest) checkpoint as a new version of ``name``; returns the version."""
    import torch

    rundir = Path(rundir).resolve()
    checkpoint = _checkpoint_of(rundir)
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    card = saved.get("model_card")
    if card is None:
        raise JobError(checkpoint, "the checkpoint does not describe its model (written by an older autocnnp)",
                       "train it again with this version, then publish")
    paths = RunDir(rundir)
    manifest = read_json(paths.manifest) or {}
    epoch = saved.get("epoch")  # epochs done when the published checkpoint was written: its metrics.csv row
    metrics = {k: v for k, v in epoch_metrics(paths, epoch).items() if k != "epoch" and isinstance(v, (int, float))}
    best = read_json(paths.checkpoints / BEST_RECORD) or {}
    checksum = (manifest.get("dataset") or {}).get("checksum", {})
    client = _client(store)
    found = client.get_experiment_by_name(EXPERIMENT)
    experiment = found.experiment_id if found else client.create_experiment(
        EXPERIMENT, artifact_location=store[1].as_uri() if store[1] else None)
    tags = {"architecture": card["architecture"]["name"], "classes": json.dumps(card["classes"]),
            "in_channels": str(card["in_channels"]), "source_run": str(rundir), "checkpoint": checkpoint.name,
            "dataset_checksum": json.dumps(checksum)[:5000]}
    if epoch is not None:
        tags["epoch"] = str(epoch)
    if best:
        tags["best"] = f"{best['metric']}={best['value']:.4f} at epoch {best['epoch']}"
    exported = (read_json(paths.export / EXPORT_CARD) or {}).get("export") or {}
    forms = {form: exported[form] for form in ("onnx", "int8")
             if (paths.export / exported.get(form, {}).get("file", "-")).is_file()}
    if forms:  # autocnnp export's forms, with what they measured
        tags["exported"] = json.dumps({form: {k: v for k, v in f.items() if k in ("file", "dice", "label_agreement")}
                                       for form, f in forms.items()})[:5000]
    run = client.create_run(experiment, tags={"mlflow.runName": name, **tags})
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        model.mkdir()
        shutil.copyfile(checkpoint, model / ZOO_CHECKPOINT)
        (model / "model_card.json").write_text(json.dumps({k: v for k, v in card.items() if k != "job"}, indent=2))
        (model / "job.xml").write_text(card["job"]["text"])
        if paths.manifest.is_file():
            shutil.copyfile(paths.manifest, model / "manifest.json")
        for file in [f["file"] for f in forms.values()] + ([EXPORT_CARD] if forms else []):
            shutil.copyfile(paths.export / file, model / file)
        client.log_artifacts(run.info.run_id, str(model), "model")
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key.replace("/", "."), float(value))
    client.set_terminated(run.info.run_id)
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=description or f"autocnnp {card['architecture']['name']}")
    summary = ", ".join(f"{k} {metrics[k]:.4f}" for k in (FOREGROUND_DICE, DICE) if k in metrics)
    version = client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id, tags=tags,
                                          description=description or summary)
    return int(version.version)


def fetch(name: str, version: int | None, dest: Path, store) -> tuple[Path, int]:
    """Download a zoo model's files into ``dest`` (complete or not at all); returns (checkpoint, version)."""
    import mlflow.artifacts

    client = _client(store)
    found = _version(client, name, version)
    dest = Path(dest)
    if (dest / ZOO_CHECKPOINT).is_file() and (read_json(dest / "zoo.json") or {}).get("version") == int(found.version):
        return dest / ZOO_CHECKPOINT, int(found.version)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        got = Path(mlflow.artifacts.download_artifacts(artifact_uri=found.source, dst_path=tmp,
                                                       tracking_uri=store[0]))
        (got / "zoo.json").write_text(json.dumps({"name": name, "version": int(found.version),
                                                  "source": found.source}))
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(got, dest)
    return dest / ZOO_CHECKPOINT, int(found.version)


@dataclass(frozen=True)
class ZooModel:
    """One version of a zoo model: its tags (architecture, classes, source run...), the metrics of the epoch
    its checkpoint was written at, where its files are and how many versions the model has."""

    name: str
    version: int
    description: str
    tags: dict[str, str]
    metrics: dict[str, float]
    files: str
    versions: int

    @property
    def classes(self) -> list[str]:
        return list(json.loads(self.tags.get("classes", "{}")).values())


def _model(client, found) -> ZooModel:
    return ZooModel(found.name, int(found.version), found.description or "", dict(found.tags),
                    dict(client.get_run(found.run_id).data.metrics), found.source,
                    len(client.search_model_versions(f"name={found.name!r}")))


def show(text: str, store) -> ZooModel:
    """The zoo model ``NAME`` (its latest version) or ``NAME/VERSION``."""
    client = _client(store)
    return _model(client, _version(client, *parse(text)))


def models(store) -> list[ZooModel]:
    """The latest version of every model in the zoo, by name."""
    client = _client(store)
    return [_model(client, _version(client, m.name, None))
            for m in sorted(client.search_registered_models(), key=lambda m: m.name)]


# --- commands ------------------------------------------------------------------------------------------

def cmd_publish(args) -> int:
    version = publish(Path(args.rundir), args.name, zoo_store(args.zoo), args.description or "")
    print(f"published zoo:{args.name}/{version} from {args.rundir} (zoo {zoo_store(args.zoo)[0]})")
    return 0


def cmd_list(args) -> int:
    found = models(zoo_store(args.zoo))
    if not found:
        print("the zoo holds no model yet (autocnnp zoo publish RUN_DIR --name NAME)")
    for model in found:
        print(f"{model.name}: {model.versions} version(s), latest {model.version} "
              f"({model.tags.get('architecture', '?')}, classes {', '.join(model.classes)}) {model.description}")
    return 0


def cmd_show(args) -> int:
    model = show(args.model, zoo_store(args.zoo))
    print(f"zoo:{model.name}/{model.version}: {model.description}")
    for key, value in sorted(model.tags.items()):
        print(f"  {key}: {value}")
    for key, value in sorted(model.metrics.items()):
        print(f"  metric {key}: {value:.4f}")
    print(f"  files: {model.files}")
    return 0


def cmd_pull(args) -> int:
    name, version = parse(args.model)
    checkpoint, version = fetch(name, version, Path(args.dir), zoo_store(args.zoo))
    print(f"zoo:{name}/{version} -> {Path(args.dir)} (checkpoint {checkpoint.name}, model_card.json, job.xml, "
          "manifest.json)")
    return 0


def add_commands(sub) -> None:
    s = sub.add_parser("zoo", help="the model zoo: publish a run's model, list, show, pull (MLflow model registry)")
    verbs = s.add_subparsers(dest="verb", required=True)

    def verb(name: str, func, doc: str):
        v = verbs.add_parser(name, help=doc, description=doc)
        v.add_argument("--zoo", help=f"the zoo: a folder or a tracking URI (default ${ZOO_ENV}, else ~/.autocnnp/zoo)")
        v.set_defaults(func=func)
        return v

    v = verb("publish", cmd_publish, "register a run's best (else latest) model as a new version of NAME")
    v.add_argument("rundir", help="the run's output folder")
    v.add_argument("--name", required=True, help="the model's name in the zoo")
    v.add_argument("--description", help="a line about it (default: its final Dice)")
    verb("list", cmd_list, "the zoo's models")
    v = verb("show", cmd_show, "one model version: tags, metrics, files")
    v.add_argument("model", help="NAME or NAME/VERSION (default: the latest version)")
    v = verb("pull", cmd_pull, "download a model version for offline use")
    v.add_argument("model", help="NAME or NAME/VERSION")
    v.add_argument("dir", help=f"the folder to write ({ZOO_CHECKPOINT}, model_card.json, job.xml, manifest.json)")
