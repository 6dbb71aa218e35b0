"""Everything that can be checked before any rank starts, in the front-end: the output folder, the
slots for the ranks, the data (checked and cached once, by content) and a minibatch per rank. Each
problem is one JobError or DataError: one line, exit code 2, nothing started."""

from __future__ import annotations

import importlib.util
import math
import zipfile
from pathlib import Path
from typing import NoReturn

from ..core.card import card_dimension, card_framework, checkpoint_card
from ..core.errors import JobError
from ..core.files import WriteRefused, atomic_write, free_bytes, size_text, space_text
from ..core.processes import usable_cores
from ..generator.protocols import shards_of, steps_per_epoch
from .hosts import parse_hostfile
from .job import Job


def fetch_pretrained(job: Job) -> None:
    """Put a ``zoo:`` model the job starts from where the ranks read it (once: it is kept in the run folder)."""
    pretrained = job.generator.pretrained
    if pretrained is None or pretrained.zoo is None:
        return
    from ..tracking.zoo import fetch, zoo_store

    name, version = pretrained.zoo
    target = pretrained.local(job.rundir)
    if not target.is_file():
        _, got = fetch(name, version, target.parent, zoo_store())
        print(f"autocnnp: pretrained from zoo:{name}/{got} ({zoo_store()[0]})", flush=True)


def check_pretrained(job: Job) -> None:
    """The checkpoint the job starts from is a checkpoint of autocnnp (a zip archive holding ``data.pkl``, or a
    legacy pickle) of the job's framework: a garbage file, or another framework's, is refused here, not by every
    rank after the launch."""
    pretrained = job.generator.pretrained
    if pretrained is None:
        return
    path = pretrained.local(job.rundir)
    try:
        with open(path, "rb") as f:
            legacy = f.read(1) == b"\x80"  # a pickle's PROTO opcode
            archive = not legacy and zipfile.is_zipfile(f) and any(n.endswith("/data.pkl")
                                                                   for n in zipfile.ZipFile(f).namelist())
    except (OSError, zipfile.BadZipFile) as exc:
        raise JobError(pretrained.where, f"the pretrained checkpoint {path} cannot be read ({exc})",
                       "name a checkpoint written by autocnnp run, its run folder, or a zoo model") from None
    if not (legacy or archive):
        raise JobError(pretrained.where, f"the pretrained checkpoint {path} is not a torch checkpoint",
                       "name a checkpoint written by autocnnp run, its run folder, or a zoo model")
    card = checkpoint_card(path) if archive else {}  # a legacy pickle: a torch 2D model
    trained, framework = (None if card is None else card_framework(card)), job.generator.framework
    if trained not in (None, framework):
        raise JobError(pretrained.where, f"the pretrained checkpoint {path} holds a {trained} model, but the job "
                       f"trains with {framework}", f"start from a checkpoint of a {framework} run of the same architecture")
    trained, dimension = (None if card is None else card_dimension(card)), job.generator.dimension
    if trained not in (None, dimension):
        raise JobError(pretrained.where, f"the pretrained checkpoint {path} holds a {trained.upper()} model, but the "
                       f"job trains a {dimension.upper()} one", f"start from a checkpoint of a {dimension.upper()} run "
                       "of the same architecture")


def check_resume(job: Job) -> None:
    """A run that resumes goes on from a checkpoint of its own framework and dimension: another framework's or a
    2D model for a 3D job (and the reverse), read without torch, is refused here, not by every rank after the
    launch."""
    gen = job.generator
    if not getattr(gen.action("checkpoint").config, "resume", False):
        return
    latest = gen.action("checkpoint").build(directory=gen.rundir.checkpoints, rank=0).latest()  # as the ranks find it
    if latest is None:
        return
    card = checkpoint_card(latest)  # read once, torch-free
    if card is None:
        return
    trained = card_framework(card)
    if trained != gen.framework:
        _refuse_resume(job, latest, "framework", f"a {trained} run", f"with {gen.framework}",
                       f"resume with framework {trained}")
    trained = card_dimension(card)
    if trained != gen.dimension:
        _refuse_resume(job, latest, "architecture_injection", f"a {trained.upper()} model",
                       f"a {gen.dimension.upper()} one", f"resume with the {trained} job it was trained with")


def _refuse_resume(job: Job, latest: Path, action: str, held: str, trains: str, fix: str) -> NoReturn:
    """Refuse to resume from ``latest``, a checkpoint of ``held`` (another framework, dimension), pointing at the
    job's ``action``."""
    raise JobError(job.generator.action(action).where or job.spec.where, f"the run folder {job.generator.rundir} "
                   f"holds a checkpoint of {held} ({latest.name}) to resume from, but the job trains {trains}",
                   f"{fix}, or start afresh with another <output> folder or resume=false on the checkpoint action")


def check_inputs(job: Job) -> None:
    """What the ranks will read, checked once before they start: the pretrained weights (a zoo model fetched
    first), the checkpoint a run resumes from, and the data with a minibatch per rank; then that what they
    will write fits. Every front-end calls it: run, submit, deploy --swarm."""
    fetch_pretrained(job)
    check_pretrained(job)
    check_resume(job)
    check_data(job)
    check_space(job)


PLOTS_BYTES = 256 * 1024  # the PNGs of training.monitor.plot_run: about 200 KiB at dpi 100


def check_space(job: Job) -> None:
    """The output folder's filesystem has room for what the run will write (its data cache is written by
    then): the checkpoints it holds at once (``keep``, the one being written and the best) at the size of
    the latest one, else of the model's tensors and optimiser state, and the plots. Refused only when it
    clearly has less: the estimate is a lower bound."""
    gen = job.generator
    rundir, checkpoints = gen.rundir, gen.action("checkpoint").config
    at_once = getattr(checkpoints, "keep", 1) + 1 + bool(getattr(checkpoints, "best_metric", ""))
    held = [p.stat().st_size for p in rundir.checkpoints.glob("*.pt")] if rundir.checkpoints.is_dir() else []
    one = max(held, default=0) or gen.action("framework").build().checkpoint_bytes(gen)
    plots = PLOTS_BYTES if any(getattr(tracker, "plots", False) for _, tracker in job.trackers) else 0
    need = max(at_once * one - sum(held), 0) + plots
    if need > free_bytes(rundir.root):
        where = job.output_where
        raise JobError(where, f"the run will write at least {size_text(need)} in {rundir} ({at_once} checkpoints of "
                       f"{size_text(one)} at once{' and its plots' if plots else ''}), more than the "
                       f"{space_text(rundir.root)}", "free space there, give the run an <output> folder on a "
                       "larger filesystem, or keep fewer checkpoints (the checkpoint action's keep)")


def check_framework(job: Job) -> None:
    """The job's framework is installed here (TensorFlow is not part of `make venv`)."""
    gen = job.generator
    check_installed(gen.framework, gen.action("framework").where or job.spec.where, "the job trains with",
                    "or choose framework torch")


def check_installed(framework: str, where, subject: str, other: str) -> None:
    """``framework`` can be imported here (a JobError saying ``subject`` it, and how to install it or ``other``)."""
    if framework == "tensorflow" and importlib.util.find_spec("tensorflow") is None:
        raise JobError(where, f"{subject} framework tensorflow, which is not installed in this environment",
                       f"run `make tensorflow` (pip install -r requirements/tensorflow.txt), {other}")


def check_output(job: Job) -> None:
    """The output folder can be written, and none of the folders the run writes in is something else."""
    rundir = job.rundir
    where = job.output_where
    probe = rundir.root / ".write-test"
    try:
        atomic_write(probe, b"")
        probe.unlink()
    except OSError as exc:
        raise JobError(where, f"the output folder {rundir} cannot be written ({exc.strerror or exc})",
                       "choose an <output> folder you can write to, or fix its permissions") from None
    for folder in rundir.folders:
        if folder.exists() and not folder.is_dir():
            raise JobError(where, f"{folder} is a file where the run keeps its {folder.name} folder",
                           "move that file away, or give this run another <output>")


def slots(job: Job, env) -> tuple[int, str]:
    """How many ranks the machines offer, and where that number comes from."""
    if job.launch.hostfile is not None:
        hosts = parse_hostfile(job.launch.hostfile, job.where("hostfile"))
        return sum(s for _, s, _ in hosts), f"the hostfile {job.launch.hostfile}"
    if env.get("SLURM_JOB_ID") and env.get("SLURM_NTASKS", "").isdigit():
        return int(env["SLURM_NTASKS"]), f"the Slurm allocation {env['SLURM_JOB_ID']}"
    cores, threads = usable_cores(), job.slurm.cpus_per_task
    return cores // threads, f"this machine's {cores} cores" + (f" at cpus_per_task={threads}" if threads > 1 else "")


def check_slots(job: Job, env) -> None:
    """No more ranks than slots (hostfile, Slurm allocation or local cores), unless oversubscribe is asked."""
    world_size = job.world_size
    offered, source = slots(job, env)
    if world_size > offered and not job.launch.oversubscribe:
        where = job.where("hostfile") if job.launch.hostfile is not None else job.spec.degree.where
        raise JobError(where, f"parallelism-degree {world_size} is more ranks than the {offered} "
                       f"slots of {source}", "lower parallelism-degree, add slots, or set <property "
                       "name=\"oversubscribe\">true</property> in <cluster> to run more ranks than slots")


def check_data(job: Job) -> None:
    """Check and cache the data once (the ranks reuse both), then that every rank gets a minibatch."""
    gen = job.generator
    try:
        samples = gen.data_format().prepare(seed=gen.seed, cache_dir=gen.rundir.cache)
    except WriteRefused as exc:  # the data cache does not fit: nothing started yet
        raise JobError(job.output_where, f"the data cache does not "
                       f"fit: {exc}", "free space there, or give the run an <output> folder on a larger "
                       "filesystem") from None
    if samples is None:
        return
    shards = shards_of(gen.action("dist_strategy").config, gen.ranks)
    per_rank = math.ceil(samples / shards)
    batch = gen.hyperparameters.minibatch_size
    if steps_per_epoch(samples, shards, batch) < 1:
        where = next((s.where for s in job.spec.hyperparameters if s.name.lower() in ("minibatch_size", "batch_size")),
                     job.spec.where)
        raise JobError(where, f"each rank gets {per_rank} of the {samples} training samples, fewer than one "
                       f"minibatch of {batch}", f"lower minibatch_size to {max(per_rank, 1)} or less, lower "
                       "parallelism-degree, or add training data")
