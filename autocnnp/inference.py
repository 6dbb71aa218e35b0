"""Inference: ``autocnnp predict`` segments volumes with a trained network and ``autocnnp evaluate`` scores
label volumes against references.

A checkpoint describes its model (``model_card``, written by the trainer): the job it was trained with
(text and overrides), the architecture and its parameters, the classes and their names, and how a volume
becomes the model's input (slice axis, size, modalities, normalisation). Predict rebuilds the network and
the input transform from it, without the job file; a job given on the command line only supplies where
to read and write, and every disagreement with the checkpoint is reported. Heavy modules are imported
when a command runs, so the CLI starts without torch.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import sys
import time
from pathlib import Path

from .core.card import card_dimension
from .core.cli_args import options_of, positive
from .core.errors import DataError, ExitCode, JobError, Source
from .core.files import atomic_write, read_json
from .core.metrics import FOREGROUND_DICE, SEGEVAL, class_key, parse_regions
from .core.processes import case_runner, default_threads
from .core.rundir import BEST_RECORD, EXPORT_CARD, LATEST_POINTER, checkpoint_file, zoo_folder
from .core.text import text_table
from .core.world import discover_world, launcher_name
from .engine.job import read_job
from .generator.assemble import Generator, assemble
from .generator.overrides import apply_overrides, parse_sets, read_variant
from .run.preflight import check_installed
from .training.monitor import MonitoringConfig

OVERALL, POOLED = "overall", "pooled"  # the rows after the cases: the mean over cases, the summed voxels
CONVENTION = "convention"  # the report's column (JSON: key) saying how a row after the cases is computed
REGIONS_DEFAULT = next(f.default for f in dataclasses.fields(MonitoringConfig) if f.name == "regions")  # as a run
PROBABILITY_MARK = "_prob-"  # <case>_prob-<value>-<class>.nii.gz: not a label volume
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SURFACE_CONVENTIONS = ("hd95/asd: surface distances in mm from the reference's voxel spacing (MONAI definitions: "
                       "HD95 = the larger directed 95th percentile, ASD = the mean of both directions); a class "
                       "absent from both masks: 0 mm; absent from one (missed or invented): the case's image "
                       "diagonal in mm (BraTS' penalty, longer than any real distance; counted in penalised/NAME)")
OVERALL_CONVENTION = ("mean over the {cases} case(s) of each per-case value; a class absent from a case's reference and "
                      "prediction has no Dice or IoU there and is left out of those means (dice_fg and region Dice "
                      "count it as 1)")
POOLED_CONVENTION = ("from the confusion matrix summed over every voxel of the {cases} case(s): large cases weigh "
                     "more; no surface distances")


# --- predict -----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PredictOptions:
    """What ``predict`` segments, with what and where it writes (``autocnnp predict``'s options)."""

    job: Path | str | None = None  #: the job file of the run: for latest/best and the default input and output
    sets: tuple[str, ...] = ()  #: the job variant that was trained, KEY=VALUE (as ``autocnnp run --set``)
    checkpoint: str = LATEST_POINTER  #: latest, best, a checkpoint file, a latest/best file or a run folder
    model: str | None = None  #: a zoo model instead: zoo:NAME or zoo:NAME/VERSION
    input: Path | str | None = None  #: dataset, folder of NIfTI images or one image (default: the job's test set)
    split: str = "test"  #: which cases of a dataset input: test, training or all
    out: Path | str | None = None  #: folder for <case>.nii.gz (default: predictions/ in the job's output)
    num_classes: int | None = None  #: default: recorded in the checkpoint
    batch_size: int | None = None  #: slices (3D: windows) per forward pass (default: see training.predictor)
    threads: int | None = None  #: CPU threads (default: OMP_NUM_THREADS, else the usable cores)
    precision: str = "auto"  #: one of PRECISIONS
    channels_last: bool | None = None  #: default: on a GPU
    probabilities: bool = False  #: also write <case>_prob-<value>-<class>.nii.gz per class
    tta: bool = False  #: average over the slice and its two flips (3D: the window's flips along its 3 axes)
    device: str | None = None  #: torch device (default cuda when available, else cpu)
    ranks: int = 1  #: processes sharing the cases (started with mpirun; srun/mpirun-started ranks split by themselves)
    ensemble: tuple[str, ...] = ()  #: checkpoints, exported models or a study's folder whose probabilities are averaged
    members: bool = False  #: with ensemble: also each member's label volumes, in OUT/member-N/


@dataclasses.dataclass(frozen=True)
class Prediction:
    """What ``predict`` wrote: a label volume per case (``labels``: case -> file) in ``out``."""

    checkpoint: Path
    out: Path
    labels: dict[str, Path]
    classes: tuple[str, ...]  #: the class names the checkpoint records (empty when it records none)
    ms_per_slice: float  #: network time per slice (per window of a 3D model)


NO_VOLUMES_HINT = ("to predict NIfTI volumes, train on volumes: `autocnnp synth DIR` writes a small Decathlon-layout "
                   "set; train a <data format=\"decathlon\"> job on it (docs, howto/tracking-zoo: "
                   "xml_configs/brain_tumour_unet.xml), then predict on DIR (its imagesTs/) or on your own volumes")

def _checkpoint_path(arg: str, gen: Generator | None) -> Path:
    """The checkpoint file ``--checkpoint`` names: ``latest`` or ``best`` of the job's run, or a path
    (core/rundir.checkpoint_file: a checkpoint file, a ``latest``/``best`` file, a run or checkpoints folder)."""
    if arg in (LATEST_POINTER, BEST_RECORD):
        if gen is None:
            raise JobError(Path(arg), f"--checkpoint {arg} needs the job whose run it is",
                           "name the job file, or give --checkpoint the path of a checkpoint file")
        checkpoints = gen.action("checkpoint").build(directory=gen.rundir.checkpoints, rank=0)
        found = checkpoints.latest() if arg == LATEST_POINTER else checkpoints.best()
        if found is None:
            raise JobError(gen.spec.where, f"no {arg} checkpoint in {gen.rundir.checkpoints}",
                           f"train first (autocnnp run {gen.spec.file})" + (", with a best_metric the run reports"
                                                                          if arg == BEST_RECORD else "")
                           + ", or pass --checkpoint PATH")
        return found
    path = checkpoint_file(Path(arg).expanduser())
    if not path.is_file():
        raise DataError(path, "checkpoint does not exist", "pass a checkpoint file, a run folder, latest or best")
    return path


def _zoo_checkpoint(model: str) -> Path:
    """The checkpoint of a zoo model (``zoo:NAME[/VERSION]``), pulled once into ~/.cache/autocnnp/zoo."""
    from .tracking.zoo import fetch, parse, zoo_store

    name, version = parse(model)
    checkpoint, _ = fetch(name, version, zoo_folder(Path.home() / ".cache" / "autocnnp" / "zoo", name, version), zoo_store())
    return checkpoint


def _load_checkpoint(path: Path) -> dict:
    """A checkpoint's state; for an exported ONNX model (``autocnnp export``), its model card beside it and no weights."""
    import torch

    if path.suffix == ".onnx":
        card = read_json(path.parent / EXPORT_CARD)
        if not isinstance(card, dict) or "architecture" not in card:
            raise DataError(path, f"an ONNX model without its model card ({EXPORT_CARD} beside it)",
                            "predict with the folder autocnnp export wrote, or export the checkpoint again")
        return {"model_card": {k: v for k, v in card.items() if k != "export"}, "model": {}, "onnx": path}

    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file
        raise DataError(path, f"cannot be read as a checkpoint ({type(exc).__name__}: {str(exc)[:200]})",
                        "pass another --checkpoint") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise DataError(path, "holds no model state dict", "pass a checkpoint written by autocnnp run")
    return state


def _trained_job(card: dict, checkpoint: Path) -> Generator:
    """The generator of the job the checkpoint was trained with, from the text it recorded."""
    job = card["job"]
    try:
        return assemble(apply_overrides(read_job(job["file"], text=job["text"]), job.get("overrides") or {}))
    except JobError as exc:
        raise DataError(checkpoint, f"the job it was trained with cannot be rebuilt: {exc}",
                        "restore the files that job names (an architecture file, say) at their paths") from None


def _disagreements(card: dict, gen: Generator) -> list[str]:
    """Where the job given to predict differs from what the checkpoint was trained with."""
    if gen.dimension != card_dimension(card):  # nothing else compares: a 2D job's settings are not a 3D model's
        return [f"dimension {gen.dimension}: a {gen.dimension.upper()} model (trained: a {card_dimension(card).upper()} "
                f"{card['architecture']['name']} model)"]
    found = []
    arch = gen.action("architecture_injection")
    if arch.entry.name != card["architecture"]["name"]:
        found.append(f"architecture {arch.entry.name} (trained: {card['architecture']['name']})")
    else:
        given = arch.recorded()
        found += [f"architecture {key} {given[key]} (trained: {trained})"
                  for key, trained in (card["architecture"].get("params") or {}).items()
                  if key in given and given[key] != trained]
    transform = gen.data_format().volumes()
    given = transform.card() if transform is not None else {}
    for key, trained in (card.get("input") or {}).items():
        if key in given and given[key] != trained:
            found.append(f"{key} {given[key]} (trained: {trained})")
    return found


def _model_and_transform(state: dict, checkpoint: Path, gen: Generator | None, num_classes: int | None):
    """``(the generator of the job it was trained with, input transform, number of classes, class names, input
    channels)`` of a checkpoint; the transform is the one the trained job's data format rebuilds from the card."""
    card = state.get("model_card")
    if card is None:  # written before checkpoints described their model: the job must say it all
        if gen is None:
            raise DataError(checkpoint, "does not describe its model (an older checkpoint)",
                            "also name the job file it was trained with")
        transform, trained = gen.data_format().volumes(), gen
        classes = num_classes or state.get("num_classes") or (transform.num_classes if transform else None)
        names: tuple[str, ...] = ()
    else:
        if card.get("input") is None:
            raise DataError(checkpoint, "was trained on data without volumes (a synthetic or in-memory format), so "
                            "it has no volumes to predict: its scores on its own validation slices are in its run's "
                            "metrics.csv", NO_VOLUMES_HINT)
        trained = _trained_job(card, checkpoint)
        classes = num_classes or card["num_classes"]
        transform = trained.data_format().volumes_from_card(card["input"], classes)
        if transform is None:
            raise DataError(checkpoint, f"its data format '{trained.action('dataset_injection').entry.name}' recorded "
                            "how a volume becomes the model's input, but cannot rebuild that from the checkpoint",
                            "give the data format a volumes_from_card(card, num_classes) method (DataFormat in "
                            "autocnnp/generator/protocols.py)")
        names = tuple(card.get("classes", {}).values())
        for text in _disagreements(card, gen) if gen is not None else []:
            print(f"autocnnp: warning: the job says {text}; using what the checkpoint was trained with", file=sys.stderr)
    if transform is None:
        raise JobError(trained.spec.where, f"predict needs volumes, but the job's data format "
                       f"'{trained.action('dataset_injection').entry.name}' has none",
                       NO_VOLUMES_HINT)
    if classes is None:
        raise DataError(checkpoint, "the number of classes the model was trained with is not recorded",
                        "pass --num-classes")
    in_channels = (card or state).get("in_channels")
    return trained, transform, int(classes), names, in_channels


def _build_network(trained: Generator, weights: dict, in_channels: int, classes: int, checkpoint: Path):
    """The trained network as a torch module (NCHW in, logits out), whatever framework trained it."""
    framework = trained.action("framework").build()
    try:
        return framework.network(trained, weights, in_channels=in_channels, num_classes=classes)
    except (RuntimeError, ValueError) as exc:
        raise DataError(checkpoint, f"does not fit the architecture with {in_channels} input channel(s) and {classes} "
                        f"classes ({str(exc).splitlines()[0]})", "pass the --num-classes it was trained with") from None


def _network(trained: Generator, state: dict, in_channels: int, classes: int, checkpoint: Path, threads: int | None):
    """The torch module that runs a checkpoint: its network, or an exported ONNX model under ONNX Runtime."""
    if "onnx" not in state:
        return _build_network(trained, state["model"], in_channels, classes, checkpoint)
    from .training.ensemble import OnnxNetwork

    try:
        return OnnxNetwork(checkpoint, threads)
    except ImportError:
        raise JobError(checkpoint, "predicting with an ONNX model needs ONNX Runtime, which is not installed",
                       "pip install -r requirements/export.txt (make venv does)") from None


def _member(path: Path, gen: Generator | None, num_classes: int | None, transform, classes: int) -> tuple:
    """``(path, (generator, state))`` of an ensemble member, refused unless it reads its input as the first member does
    and has its classes."""
    state = _load_checkpoint(path)
    trained, own, own_classes, _, _ = _model_and_transform(state, path, gen, num_classes)
    if own.card() != transform.card() or own_classes != classes:
        raise DataError(path, f"this ensemble member reads {own.card()} with {own_classes} classes, the first "
                        f"{transform.card()} with {classes}", "ensemble models trained on the same input and classes "
                        "(the folds of one study, say)")
    return path, (trained, state)


def _members(args: tuple[str, ...], gen: Generator | None) -> list[Path]:
    """The checkpoints of ``--ensemble``: each a checkpoint, exported model or run folder; a study's output folder
    (its folds.json) stands for the best (else latest) checkpoint of each of its folds."""
    from .core.rundir import RunDir

    found = []
    for arg in args:
        folder = RunDir(Path(arg).expanduser())
        if folder.folds_split.is_file():
            k = int((read_json(folder.folds_split) or {}).get("folds") or 0)
            folds = [folder.fold(f).root for f in range(k) if folder.fold(f).root.is_dir()]
            if not folds:
                raise DataError(folder.root, "the study has trained no fold yet", "run autocnnp study first")
            found += [_checkpoint_path(str(f), gen) for f in folds]
        else:
            found.append(_checkpoint_path(arg, gen))
    return found


def probability_file(case: str, names: tuple[str, ...], k: int) -> str:
    """The name of the probability volume of class ``k`` of ``case``: ``case_004_prob-1-edema.nii.gz``."""
    return f"{case}{PROBABILITY_MARK}{k}-{class_key(names[k]) if k < len(names) else 'class'}.nii.gz"


def _check_images(cases: list, transform, in_channels: int | None) -> int:
    """Every input image's header, read before anything is written (a refused predict creates nothing): a
    NIfTI image whose channels, after the modality selection, are the ones the model reads (the first
    image's when the checkpoint does not say). Returns the model's input channels."""
    from .data.volumes import image_shape, open_nifti

    for case in cases:
        path = Path(case.image)
        channels = transform.input_channels(image_shape(path, open_nifti(path).shape)[3], path)
        in_channels = in_channels or channels
        if channels != in_channels:
            raise DataError(path, f"image has {channels} channel(s) after modality selection, the model takes "
                            f"{in_channels}", "give every input the same modalities")
    return in_channels


class RanksFailed(RuntimeError):
    """A rank of a ``predict --ranks`` ended with an error (its own message went to stderr already)."""


def cmd_predict(args) -> int:
    try:
        predict(options_of(PredictOptions, args))
    except RanksFailed as exc:
        print(f"autocnnp: {exc}", file=sys.stderr, flush=True)
        return ExitCode.FAILED
    return 0


def rank_argv(options: PredictOptions, checkpoint: Path, out: Path, source: Path) -> list[str]:
    """``autocnnp predict`` as each rank runs it: the options given, with the checkpoint, input and output the
    front-end resolved (absolute paths), without ``--ranks``."""
    argv = [sys.executable, "-m", "autocnnp", "predict"] + ([str(Path(options.job).resolve())] if options.job else [])
    argv += [f"--set={s}" for s in options.sets]
    argv += ["--checkpoint", str(checkpoint.resolve()), "--input", str(source.resolve()), "--split", options.split,
             "--out", str(out.resolve()), "--precision", options.precision]
    for flag, value in (("--num-classes", options.num_classes), ("--batch-size", options.batch_size),
                        ("--threads", options.threads), ("--device", options.device)):
        argv += [flag, str(value)] if value is not None else []
    if options.channels_last is not None:
        argv.append("--channels-last" if options.channels_last else "--no-channels-last")
    argv += ["--ensemble", *options.ensemble] + ["--members"] * options.members if options.ensemble else []
    return argv + ["--probabilities"] * options.probabilities + ["--tta"] * options.tta


def _run_ranks(ranks: int, argv: list[str]) -> None:
    """Run ``argv`` on ``ranks`` processes (``mpirun -np``, one session stopped as a whole on any signal or error);
    RanksFailed when a rank fails."""
    import os
    import shutil

    from .run.processes import start, stop_session

    if shutil.which("mpirun") is None:
        raise JobError(Path("--ranks"), f"--ranks {ranks} starts the ranks with mpirun (Open MPI), which is not "
                       "installed", "install Open MPI, or run `srun -n N autocnnp predict ...` in a Slurm allocation")
    env = dict(os.environ)
    if os.geteuid() == 0:  # containers and CI often run as root; Open MPI refuses that by default
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    cmd = ["mpirun", "-np", str(ranks), "--oversubscribe", "--bind-to", "none"]
    cmd += [arg for name in ("PATH", "PYTHONPATH", "VIRTUAL_ENV", "OMP_NUM_THREADS") if name in env
            for arg in ("-x", name)]
    proc = start(cmd + argv, env)
    try:
        code = proc.wait()  # a signal to this process (Interrupted) stops the whole session below
    finally:
        if proc.poll() is None:
            stop_session(proc, grace_s=5.0)
    if code != 0:
        raise RanksFailed(f"predict on {ranks} ranks failed (mpirun exit code {code}); label volumes the other ranks "
                          "finished are written")


def predict(options: PredictOptions) -> Prediction:
    """Segment the volumes ``options`` names with a trained network; prints a line per volume."""
    import numpy as np
    import torch

    from .data.volumes import read_case, save_label, save_probabilities
    from .training.ensemble import Ensemble
    from .training.precision import autocast_dtype
    from .training.predictor import Predictor, SharedPass, prepare_network

    world = discover_world()  # ranks started by srun or mpirun share the cases
    torch.set_num_threads(options.threads or default_threads(world.local_world_size))
    gen = assemble(read_variant(options.job, parse_sets(list(options.sets)))) if options.job else None
    members = _members(options.ensemble, gen) if options.ensemble else None
    checkpoint = members[0] if members else \
        _zoo_checkpoint(options.model) if options.model else _checkpoint_path(options.checkpoint, gen)
    state = _load_checkpoint(checkpoint)
    trained, transform, classes, names, in_channels = _model_and_transform(state, checkpoint, gen, options.num_classes)
    others = [_member(path, gen, options.num_classes, transform, classes) for path in (members or [])[1:]]
    check_installed(trained.framework, Source(checkpoint, text=str(checkpoint)), "the model was trained with",
                    "or predict on a machine that has it")
    given_transform = gen.data_format().volumes() if gen is not None else None
    source = Path(options.input) if options.input else (given_transform.default_input if given_transform else None)
    if source is None:
        raise JobError(checkpoint, "no volumes to segment", "pass --input (a dataset, a folder of NIfTI images or one)")
    cases = transform.cases(source, options.split)
    out = Path(options.out) if options.out else (gen.rundir.predictions if gen is not None else None)
    if out is None:
        raise JobError(checkpoint, "no folder for the predictions", "pass --out, or name the job")
    if out.exists() and not out.is_dir():
        raise DataError(out, "exists and is not a folder", "name a folder for the predicted label volumes")
    in_channels = _check_images(cases, transform, in_channels)
    if options.ranks > 1 and launcher_name() is None:  # checked here, once: the ranks split the cases
        ranks = min(options.ranks, len(cases))  # a rank without a volume would have nothing to do
        if ranks < options.ranks:
            print(f"--ranks {options.ranks} but {len(cases)} volume(s): {ranks} rank(s), one a volume", flush=True)
        if ranks > 1:
            print(f"predicting {len(cases)} volume(s) on {ranks} ranks (mpirun), each writing its share to {out}",
                  flush=True)
            _run_ranks(ranks, rank_argv(options, checkpoint, out, source))
            return Prediction(checkpoint, out, {case.name: out / f"{case.name}.nii.gz" for case in cases}, names, 0.0)
    every = len(cases)
    cases = cases[world.rank::world.world_size]
    if not cases and world.rank > 0:  # more ranks than volumes (srun -n N): rank 0 says so for them
        return Prediction(checkpoint, out, {}, names, 0.0)
    idle = f"; {world.world_size - every} rank(s) without a volume" if world.rank == 0 and world.world_size > every else ""

    device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise JobError(checkpoint, f"--device {options.device}: torch sees no CUDA GPU here", "leave --device out")
    dtype = autocast_dtype(options.precision, device)
    channels_last = device.type == "cuda" if options.channels_last is None else options.channels_last
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # a volume's batches share one shape: tune the convolutions once
    model, alone = None, []  # the first volume written creates the out folder
    written: dict[str, Path] = {}
    total_units, total_infer, total_wall, unit = 0, 0.0, 0.0, "slice"
    arithmetic = f"{str(dtype).removeprefix('torch.')} autocast" if dtype else "float32"
    batches = f"batches of {options.batch_size}, " if options.batch_size else ""
    share = f" (rank {world.rank} of {world.world_size}: {len(cases)} of {every}{idle})" if world.world_size > 1 else ""
    used = f"an ensemble of {len(others) + 1} ({', '.join(str(p) for p in members or [])})" if others else checkpoint
    print(f"predicting {len(cases)} volume(s){share} with {used} on {device} ({torch.get_num_threads()} thread(s), "
          f"{arithmetic}{', channels_last' if channels_last else ''}, {batches}{transform.describe()}"
          f"{', flip test-time augmentation' if options.tta else ''})")
    for case in cases:
        start = time.perf_counter()
        image, _, img = read_case(case)  # as stored: the transform makes the model's input a part at a time
        affine, header = np.asarray(img.affine, dtype=np.float64), img.header
        read = time.perf_counter()
        if model is None:
            networks = [_network(trained, state, in_channels, classes, checkpoint, options.threads),
                        *(_network(*other, in_channels, classes, path, options.threads) for path, other in others)]
            network = networks[0] if len(networks) == 1 else Ensemble(networks, each=options.members)
            model = Predictor(prepare_network(network, device, channels_last), device, options.batch_size, options.tta,
                              dtype, channels_last, getattr(network, "groups", 1))
            if model.groups > 1:  # one pass of each member gives the ensemble and each member alone
                shared = SharedPass(model)
                model, alone = shared.view(0), [shared.view(group) for group in range(1, model.groups)]
        done = transform.predict(image, img, Path(case.image), model, options.probabilities)
        for index, member in enumerate(alone):  # each member on its own, for evaluate to compare
            save_label(transform.predict(image, img, Path(case.image), member, False).labels, affine, header,
                       out / f"{MEMBER_FOLDER}{index}" / f"{case.name}.nii.gz")
        del image
        written_at = time.perf_counter()
        target = out / f"{case.name}.nii.gz"
        save_label(done.labels, affine, header, target)
        written[case.name] = target
        if options.probabilities:  # a float32 volume per class, named after it
            for k in range(done.probabilities.shape[0]):
                save_probabilities(done.probabilities[k], affine, header, out / probability_file(case.name, names, k))
        wall = time.perf_counter() - start
        unit = done.unit
        total_units, total_infer, total_wall = total_units + done.units, total_infer + done.network_s, total_wall + wall
        print(f"  {case.name}: {done.units} {unit}s, inference {1000 * done.network_s / max(done.units, 1):.2f} "
              f"ms/{unit}, {wall:.3f} s/volume (read {read - start:.2f} s, prepare {done.prepare_s:.2f} s, network "
              f"{done.network_s:.2f} s, resize back and write {done.back_s + time.perf_counter() - written_at:.2f} s)"
              f" -> {target}")
    named = f"; classes: {', '.join(f'{i} {n}' for i, n in enumerate(names))}" if names else ""
    per_unit = 1000 * total_infer / max(total_units, 1)
    print(f"{len(cases)} volume(s), {total_units} {unit}s: inference {per_unit:.2f} ms/{unit}, "
          f"{total_wall / max(len(cases), 1):.3f} s/volume on average; label volumes in {out}{named}")
    return Prediction(checkpoint, out, written, names, per_unit)


# --- evaluate ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class EvaluateOptions:
    """What ``evaluate`` scores against what (``autocnnp evaluate``'s options)."""

    pred: Path | str  #: folder of predicted label volumes (<case>.nii.gz)
    ref: Path | str  #: the dataset (dataset.json / CSV; held-out labels in labelsTs/) or a folder of label volumes
    out: Path | str | None = None  #: report file, .csv or .json (default PRED/metrics.csv)
    num_classes: int | None = None  #: default: the labels the dataset declares, else the largest label + 1
    regions: str = REGIONS_DEFAULT  #: auto, none, or NAME=1,2,3; NAME=2,3
    workers: int = 1  #: cases scored at once, each in its own process


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """The scores ``evaluate`` wrote to ``report``: a row per case (``cases``), the mean over cases
    (``overall``) and the scores of the summed voxels (``pooled``); each row maps a metric to its value."""

    report: Path
    cases: list[dict]
    overall: dict
    pooled: dict
    classes: dict[int, str]
    regions: dict
    members: dict = dataclasses.field(default_factory=dict)  #: an ensemble's members (PRED/member-N/): their overall rows


MEMBER_FOLDER = "member-"  # predict --ensemble --members writes each member's label volumes into PRED/member-N/

def _reference_labels(ref: Path) -> tuple[dict[str, Path], dict[str, str], dict[int, str]]:
    """``({case: label file}, {case: split}, {class value: name})`` of a dataset (its training labels and the
    held-out labels next to its test images, ``labelsTs/``) or of a folder of label volumes."""
    from .data.index import is_dataset, nifti_files, read_dataset

    if is_dataset(ref):
        ds = read_dataset(ref)
        labels = {c.name: Path(c.label) for c in ds.training}
        splits = dict.fromkeys(labels, "training")
        for case in ds.test:
            held_out = Path(case.image).parent.parent / "labelsTs" / Path(case.image).name
            if held_out.is_file():
                labels[case.name], splits[case.name] = held_out, "test"
        return labels, splits, dict(ds.labels)
    if ref.is_dir():
        labels = nifti_files(ref)
        return labels, dict.fromkeys(labels, "folder"), {}
    raise DataError(ref, "is neither a dataset (dataset.json / CSV) nor a folder of label volumes",
                    "name the dataset the images came from or a folder of reference label files")


def _table(rows: list[dict], columns) -> str:
    cells = [[str(r["case"]), *(f"{r[c]:.4f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns)]
             for r in rows]
    return text_table(["case", *columns], cells)


def _overall(rows: list[dict], penalised: dict[str, int]) -> dict:
    """The mean over the case rows of every value they hold (``voxels``: the sum), with the cases each
    surface column penalised (``penalised/NAME``)."""
    out: dict = {"case": OVERALL}
    for column in dict.fromkeys(k for r in rows for k in r if k != "case"):
        values = [r[column] for r in rows if column in r]
        out[column] = sum(values) if column == "voxels" else sum(values) / len(values)
    out.update({f"penalised/{name}": count for name, count in penalised.items()})
    out[CONVENTION] = f"{OVERALL_CONVENTION.format(cases=len(rows))}; {SURFACE_CONVENTIONS}"
    return out


def _write_report(out: Path, rows: list[dict], classes: dict[int, str], regions: dict) -> None:
    """The per-case rows, then the overall and pooled rows (each saying how it is computed), as JSON when
    ``out`` ends in .json, else as CSV."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".json":
        def plain(v):  # JSON has no inf or NaN: "inf" and null
            return {k: plain(x) for k, x in v.items()} if isinstance(v, dict) else [plain(x) for x in v] \
                if isinstance(v, list | tuple) else v if not isinstance(v, float) or math.isfinite(v) \
                else ("inf" if v > 0 else None)

        report = {"cases": rows[:-2], OVERALL: rows[-2], POOLED: rows[-1],
                  "classes": {str(k): v for k, v in classes.items()}, "regions": regions}
        atomic_write(out, json.dumps(plain(report), indent=2, allow_nan=False) + "\n")
        return
    columns = [k for k in dict.fromkeys(k for r in rows for k in r) if k != CONVENTION] + [CONVENTION]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns, restval="")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) and math.isfinite(v) else v) for k, v in r.items()})
    atomic_write(out, text.getvalue())


def _score_case(name: str, pred_path: Path, ref_path: Path, fixed: int | None, declared: dict[int, str],
                regions: str, where: Path) -> tuple[dict, object, list[str]]:
    """``(row, confusion matrix, the surface columns given the penalty)`` of one case: its labels are read as
    uint8 (for up to 256 classes), the surface distances computed on the masks' boundary voxels."""
    import numpy as np

    from .data.volumes import load_labels
    from .training.metrics import report, volume_confusion
    from .training.surface import class_surface_distances, image_diagonal, voxel_spacing

    pred, pred_affine = load_labels(pred_path)
    truth, ref_affine = load_labels(ref_path)
    if pred.shape != truth.shape:
        raise DataError(pred_path, f"prediction shape {pred.shape} differs from reference shape {truth.shape} "
                        f"of {ref_path}", "predict on the reference's own images (autocnnp predict keeps "
                        "the source shape)")
    if not np.allclose(pred_affine, ref_affine, atol=1e-3):
        print(f"autocnnp: warning: {pred_path}: affine differs from the reference {ref_path}; "
              "comparing voxel by voxel", file=sys.stderr)
    k = max(2, int(fixed)) if fixed else max(2, int(pred.max(initial=0)) + 1, int(truth.max(initial=0)) + 1)
    try:
        conf = volume_confusion(pred, truth, k)
    except ValueError as exc:
        path = pred_path if int(pred.max(initial=0)) >= k else ref_path
        raise DataError(path, f"{exc} ({k} classes)", "pass --num-classes or fix the labels") from None
    names = tuple(declared.get(i, f"class {i}") for i in range(k))
    spacing = voxel_spacing(ref_affine)
    surface = class_surface_distances(pred, truth, spacing, range(1, k))
    penalty, penalised = image_diagonal(truth.shape, spacing), []
    row = {"case": name, **report(conf, names, _regions(regions, names, where)), "voxels": int(conf.sum())}
    for c, distances in surface.items():
        key = class_key(names[c])
        if not math.isfinite(distances[0]):  # exactly one mask holds the class
            distances, penalised = (penalty, penalty), [*penalised, key]
        row[f"hd95/{key}"], row[f"asd/{key}"] = distances
    return row, conf, penalised


def _scored(position: int, *case) -> tuple[int, tuple]:
    return position, _score_case(*case)


def cmd_evaluate(args) -> int:
    scores = evaluate(options_of(EvaluateOptions, args))
    overall, pooled = scores.overall, scores.pooled
    shown = [FOREGROUND_DICE, *(k for k in overall if k.startswith(("dice/", "region_dice/")) and k != "dice/background"),
             *(k for k in overall if k.startswith("hd95/"))]
    print(_table([*scores.cases, overall, pooled], shown))
    for row in (overall, pooled):
        print(f"{row['case']}: " + ", ".join(f"{m} {row[m]:.4f}" for m in SEGEVAL) + f" ({row[CONVENTION]})")
    print(f"{len(scores.cases)} case(s), {len(scores.classes)} classes; wrote {scores.report}")
    if scores.members:  # an ensemble beside each of its members, mean over the cases
        print(_table([{**overall, "case": "ensemble"}, *({**row, "case": name} for name, row in scores.members.items())],
                     shown))
    return 0


def evaluate(options: EvaluateOptions) -> Evaluation:
    """Score the predicted label volumes against their references and write the report."""
    import numpy as np

    from .data.index import nifti_files
    from .training.metrics import report

    pred_dir, ref = Path(options.pred), Path(options.ref)
    if not pred_dir.is_dir():
        raise DataError(pred_dir, "is not a folder of predicted label volumes", "name the folder `autocnnp predict` wrote")
    preds = {name: p for name, p in nifti_files(pred_dir).items() if PROBABILITY_MARK not in name}
    if not ref.exists():
        raise DataError(ref, "reference does not exist", "name the dataset or a folder of reference label files")
    out = Path(options.out) if options.out else pred_dir / "metrics.csv"
    if out.suffix.lower() not in (".csv", ".json"):
        raise DataError(out, "is neither a .csv nor a .json file", "name the report file.csv or file.json")
    refs, splits, declared = _reference_labels(ref)
    matched = [name for name in preds if name in refs]
    if not matched:
        raise DataError(pred_dir, f"no prediction matches a reference case of {ref} by name (references: "
                        f"{', '.join(sorted(refs)[:5]) or 'none'}{' ...' if len(refs) > 5 else ''})",
                        "predictions are named after their cases (case_000.nii.gz for case_000); a dataset's held-out "
                        "labels are read from labelsTs/ next to imagesTs/")
    unmatched = [name for name in preds if name not in refs]
    if unmatched:
        print(f"autocnnp: note: {len(unmatched)} prediction(s) have no reference and are skipped: "
              f"{', '.join(unmatched[:5])}{' ...' if len(unmatched) > 5 else ''}", file=sys.stderr)
    scored_splits = {splits[name] for name in matched}
    missing = sorted(name for name, split in splits.items() if split in scored_splits and name not in preds)
    if missing:
        print(f"autocnnp: note: {len(missing)} reference case(s) have no prediction and are not scored: "
              f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}", file=sys.stderr)

    fixed = options.num_classes or (max(declared) + 1 if declared else None)  # declared values may leave gaps
    _regions(options.regions, (), pred_dir)  # a bad --regions is refused before any case is read
    jobs = [(i, name, preds[name], refs[name], fixed, declared, options.regions, pred_dir) for i, name in enumerate(matched)]
    results: list = [None] * len(jobs)
    with case_runner(min(options.workers, len(jobs))) as run:  # one case in memory per worker
        for position, result in run(_scored, jobs):
            results[position] = result
    rows = [row for row, _, _ in results]
    penalised: dict[str, int] = {}
    for _, _, keys in results:
        for key in keys:
            penalised[key] = penalised.get(key, 0) + 1
    num_classes = max(conf.shape[0] for _, conf, _ in results)
    total = np.zeros((num_classes, num_classes), dtype=np.int64)
    for _, conf, _ in results:
        total[: conf.shape[0], : conf.shape[1]] += conf
    names = tuple(declared.get(i, f"class {i}") for i in range(num_classes))
    regions = _regions(options.regions, names, pred_dir)
    overall = _overall(rows, penalised)
    pooled = {"case": POOLED, **report(total, names, regions), "voxels": int(total.sum()),
              CONVENTION: POOLED_CONVENTION.format(cases=len(rows))}
    classes = dict(enumerate(names))
    _write_report(out, [*rows, overall, pooled], classes, regions)
    members = {folder.name: evaluate(dataclasses.replace(options, pred=folder, out=folder / out.name)).overall
               for folder in sorted(pred_dir.glob(f"{MEMBER_FOLDER}*"), key=lambda p: p.name) if folder.is_dir()}
    return Evaluation(out, rows, overall, pooled, classes, regions, members)


def _regions(text: str, names: tuple[str, ...], where: Path) -> dict:
    try:
        return parse_regions(text, names)
    except ValueError as exc:
        raise JobError(where, f"--regions: {exc}", "write NAME=1,2,3; NAME=2,3, auto or none") from None


def add_commands(sub) -> None:
    """Add ``predict`` and ``evaluate`` to the ``autocnnp`` sub-parsers ``sub``."""
    doc = ("segment volumes with a trained network, slice by slice (2D) or through sliding windows (3D), and write "
           "NIfTI label volumes on each volume's own grid (the checkpoint describes its model: the job file is optional)")
    s = sub.add_parser("predict", help=doc, description=doc)
    s.add_argument("job", nargs="?", help="the XML job file of the run (optional: for latest/best, the default "
                                          "input and output folders)")
    s.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE",
                   help="the job variant that was trained (as `autocnnp run --set`)")
    s.add_argument("--checkpoint", default=PredictOptions.checkpoint,
                   help="latest (default) or best of the job's run, or a checkpoint file, a latest/best file in a "
                        "checkpoints folder, a run folder (its best, else its latest), or a model autocnnp export "
                        "wrote (model.onnx, model.int8.onnx: run with ONNX Runtime)")
    s.add_argument("--model", help="a zoo model instead: zoo:NAME or zoo:NAME/VERSION (the zoo: $AUTOCNNP_ZOO, else "
                                   "~/.autocnnp/zoo)")
    s.add_argument("--input", default=None,
                   help="dataset folder/index, folder of NIfTI images or one image (default: the job's <test>, "
                        "else its <train> dataset)")
    s.add_argument("--split", choices=("test", "training", "all"), default=PredictOptions.split,
                   help="which cases of a dataset input to segment (default test)")
    s.add_argument("--out", default=None,
                   help="folder for the label volumes <case>.nii.gz (default: predictions/ in the job's output)")
    s.add_argument("--num-classes", type=positive, default=None,
                   help="classes the model was trained with (default: recorded in the checkpoint)")
    s.add_argument("--batch-size", type=positive, default=None,
                   help="slices per forward pass, taken across the whole volume (default: 16 on a GPU; on a CPU as "
                        "many as make one 512 x 512 slice's pixels, at most 16); 3D: windows (default 2 on a GPU, "
                        "1 on a CPU)")
    s.add_argument("--threads", type=positive, default=None,
                   help="CPU threads (default: OMP_NUM_THREADS, else the cores this process may use); on a machine "
                        "other work keeps busy, --threads 1 per process is best (all threads wait for the slowest)")
    s.add_argument("--precision", choices=PRECISIONS, default=PredictOptions.precision,
                   help="the network's arithmetic: auto (default) is bf16 autocast on a GPU (fp16 where it has no "
                        "bf16) and fp32 on a CPU; probabilities are float32 either way")
    s.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format for the network (default: on a GPU)")
    s.add_argument("--probabilities", action="store_true",
                   help="also write the probability of each class as a float32 volume, "
                        "<case>_prob-<value>-<class>.nii.gz")
    s.add_argument("--tta", action="store_true", help="average over the slice and its two flips (3x the time); 3D: "
                                                      "over the window's 8 flips along its axes (8x)")
    s.add_argument("--device", default=None, help="torch device (default cuda when available, else cpu)")
    s.add_argument("--ranks", type=positive, default=PredictOptions.ranks,
                   help="processes sharing the cases, started with mpirun after the inputs are checked; each case is "
                        "written once, by one rank (default 1). Ranks a launcher started (srun -n N, mpirun -np N) "
                        "split the cases by themselves")
    s.add_argument("--ensemble", nargs="+", default=(), metavar="MODEL",
                   help="average the class probabilities of several models instead of --checkpoint: checkpoint files, "
                        "run folders, exported model.onnx / model.int8.onnx files, or a study's output folder (its folds)")
    s.add_argument("--members", action="store_true", help="with --ensemble: also write each member's label volumes "
                   "into OUT/member-N/ (evaluate then compares the ensemble with each)")
    s.set_defaults(func=cmd_predict)

    doc = ("score predicted label volumes against references: SegEval, Dice and IoU per class, region Dice and "
           "surface distances (HD95, ASD in mm) per case and overall")
    s = sub.add_parser("evaluate", help=doc, description=doc)
    s.add_argument("pred", help="folder of predicted label volumes (<case>.nii.gz)")
    s.add_argument("ref", help="the dataset (dataset.json / CSV; its held-out labels in labelsTs/ too) or a folder "
                               "of reference label volumes")
    s.add_argument("--out", default=None, help="report file, .csv or .json (default PRED/metrics.csv)")
    s.add_argument("--num-classes", type=positive, default=None,
                   help="number of classes (default: the labels dataset.json declares, else the largest label + 1)")
    s.add_argument("--regions", default=EvaluateOptions.regions, help="groups of classes scored as one: auto (BraTS regions "
                                                              "for brain-tumour labels), none, or NAME=1,2,3; NAME=2,3")
    s.add_argument("--workers", type=positive, default=EvaluateOptions.workers,
                   help="cases scored at once, each in its own process (default 1; each holds one case in memory)")
    s.set_defaults(func=cmd_evaluate)
