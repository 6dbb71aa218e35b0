"""The reproducibility record: ``manifest.json`` in every run's output folder (thesis chapter 5).

Rank 0 writes it (atomically: a temporary file renamed over the old one) when the run starts,
completes it once the dataset is built, and closes it when the run ends. It describes the whole
training ecosystem the thesis lists as sources of variability (Figure 5.1, section 5.5):

``job``          the job file's path, text and sha256, and the ``--set`` overrides of a variant
``plan``         the resolved generator: every action, its implementation, where it came from
                 (job, default, chosen by the engine), its parameters and plug-ins (with the sha256
                 of user code files); the hyperparameters, monitoring and cluster settings
``seeds``        the seed and how every random stream derives from it
``determinism``  whether deterministic mode was on and what it set
``dataset``      format, parameters, a checksum (and how it was computed), split sizes and
                 ratios, the augmentation
``software``     Python, autocnnp (and its git commit), torch, CUDA, cuDNN, NCCL, gloo, numpy,
                 mpi4py, the MPI library, Open MPI's ``mpirun --version``, horovod if installed
``hardware``     host, CPU model, cores, memory, GPUs, ranks
``repeats``      how many runs of this setting were made (``autocnnp run --repeat K``) and which
``invocations``  every start of the run (a resumed run adds one), with status and end time
``restarts``     every automatic restart of a failed run (``max_restarts``): when, and after what
``final_metrics``  the last row of metrics.csv

Nothing here needs the GPU or the network; every probe that fails is recorded as unknown.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import hashlib
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from .. import __version__
from ..core.files import jsonable, read_json, sha256_file, sha256_text, write_json
from ..core.rundir import RunDir
from ..engine.values import describe
from ..generator.protocols import RunInfo, Tracker
from ..training.monitor import outcome
from .job import Job

PARENT_RUN = "AUTOCNNP_PARENT_RUN"  # the run folder of the parent of the runs started in the block (trackers)

FORMAT = 1
CONTENT_LIMIT = 512 * 2**20  # data_checksum=auto hashes contents up to this many bytes


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


# --- reading and writing --------------------------------------------------------------------------

def read(rundir: RunDir) -> dict | None:
    """The manifest of a run (None if there is none or it is unreadable)."""
    return read_json(rundir.manifest)


def update(rundir: RunDir, **sections) -> dict:
    """Merge ``sections`` into the manifest (top-level keys replaced) and write it."""
    manifest = read(rundir) or {}
    manifest.update(sections)
    write_json(rundir.manifest, manifest)
    return manifest


# --- the sections -----------------------------------------------------------------------------------

def job_record(spec) -> dict:
    """The job file (path, text, sha256) and the ``--set`` overrides of the variant."""
    file = Path(spec.file)
    try:
        digest = sha256_file(file)
    except OSError:
        digest = None
    overrides = dict(spec.overrides)
    sets = [part for k, v in overrides.items() for part in ("--set", f"{k}={v}")]
    return {"file": str(file), "sha256": digest, "text": spec.text,
            "overrides": overrides, "reproduce": shlex.join(["autocnnp", "run", *sets, str(file)])}


def _entry_record(entry) -> dict:
    out = {"implementation": entry.name, "origin": entry.origin}
    if entry.file is not None:
        with contextlib.suppress(OSError):
            out["file_sha256"] = sha256_file(entry.file)
    return out


def plan_record(job: Job) -> dict:
    gen = job.generator
    actions = []
    for module in gen.root.modules():
        for a in module.actions:
            how = "job" if a.explicit else "default" if a.entry.name == a.point.default else "chosen by the engine"
            actions.append({"type": a.type, "module": module.name, "extensible": a.point.extensible,
                            **_entry_record(a.entry), "set_by": how, "parameters": a.recorded(),
                            "plugins": {name: _entry_record(p) for name, p in a.plugins.items()}})
    return {"task": gen.spec.task, "parallelism_degree": gen.ranks, "processes": gen.world_size,
            "virtual_ranks": gen.virtual_ranks, "seed": gen.seed, "output": str(gen.rundir),
            "actions": actions, "hyperparameters": describe(gen.hyperparameters),
            "monitoring": describe(job.monitoring),
            "cluster": {**describe(job.launch), **describe(job.slurm), **describe(job.deploy)}}


def seeds_record(seed: int) -> dict:
    return {"seed": seed,
            "initial_parameters": "random, numpy and torch seeded with seed before the model is built "
                                  "(identical on every rank; DDP also broadcasts rank 0's parameters)",
            "dataset": "the dataset is built with seed (synthetic items: numpy default_rng([seed, index]))",
            "per_epoch": "random, numpy and torch re-seeded with seed + 1000 x epoch + rank at each epoch",
            "sampler": "DistributedSampler(seed=seed), set_epoch(epoch)"}


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=cwd, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _source_commit() -> dict:
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists() or shutil.which("git") is None:
        return {}
    commit = _run(["git", "rev-parse", "HEAD"], root)
    if commit is None:
        return {}
    try:  # read-only: exit 1 when tracked files differ from the commit
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=root, timeout=10,
                               capture_output=True).returncode == 1
    except (OSError, subprocess.SubprocessError):
        dirty = None
    return {"git_commit": commit, "git_uncommitted_changes": dirty}


def software() -> dict:
    """Versions of everything the run depends on (torch is imported; MPI is not initialised)."""
    out: dict = {"python": sys.version.split()[0], "python_implementation": platform.python_implementation(),
                 "python_executable": sys.executable, "os": platform.platform(),
                 "autocnnp": {"version": __version__, **_source_commit()}}
    try:
        import torch
        import torch.distributed as dist

        cuda = torch.cuda.is_available()
        out["torch"] = torch.__version__
        out["torch_cuda"] = torch.version.cuda
        out["cudnn"] = torch.backends.cudnn.version() if cuda else None
        out["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if cuda and dist.is_nccl_available() else None
        out["gloo"] = dist.is_gloo_available()
        out["torch_mpi_backend"] = dist.is_mpi_available()
    except Exception as exc:  # noqa: BLE001 - a broken probe must not stop the run
        out["torch"] = f"unknown ({exc})"
    for name in ("numpy", "mpi4py", "lxml", "psutil", "nibabel", "matplotlib", "tensorboard", "horovod", "keras",
                 "tensorflow", "tensorflow-cpu"):
        out[name] = _version(name)
    mpirun = shutil.which("mpirun")
    version = _run([mpirun, "--version"]) if mpirun else None
    out["mpirun"] = {"path": mpirun, "version": version.splitlines()[0] if version else None}
    out["mpi_library"] = mpi_library()
    return out


def mpi_library() -> str | None:
    """``MPI.Get_library_version()`` when mpi4py's MPI module is loaded already (never initialises MPI)."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None:
        return None
    try:
        return mpi.Get_library_version().replace("\x00", "").strip().splitlines()[0]
    except Exception:  # noqa: BLE001
        return None


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def hardware(world_size: int) -> dict:
    import psutil

    out = {"host": socket.gethostname(), "machine": platform.machine(), "cpu_model": _cpu_model(),
           "cpu_logical_cores": os.cpu_count(), "cpu_physical_cores": psutil.cpu_count(logical=False),
           "memory_bytes": psutil.virtual_memory().total, "ranks": world_size,
           "note": "the host of rank 0; other hosts are those of the hostfile"}
    try:
        import torch

        out["gpus"] = [{"name": torch.cuda.get_device_name(i),
                        "memory_bytes": torch.cuda.get_device_properties(i).total_memory,
                        "capability": ".".join(map(str, torch.cuda.get_device_capability(i)))}
                       for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    except Exception as exc:  # noqa: BLE001
        out["gpus"] = f"unknown ({exc})"
    out["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    return out


def dataset_checksum(roots: list[Path], method: str = "auto") -> dict:
    """sha256 over the files under ``roots`` (sorted by path): their names, sizes and contents
    (``content``) or modification times (``stat``, fast but machine-specific)."""
    files: list[tuple[str, Path]] = []
    for root in roots:
        if root.is_file():
            files.append((root.name, root))
        elif root.is_dir():
            for dirpath, dirnames, names in os.walk(root):
                dirnames.sort()
                files += [(str(Path(dirpath, n).relative_to(root.parent)), Path(dirpath, n)) for n in sorted(names)]
    files.sort()
    total = sum(p.stat().st_size for _, p in files)
    if method == "auto":
        method = "content" if total <= CONTENT_LIMIT else "stat"
    h = hashlib.sha256()
    for name, path in files:
        st = path.stat()
        third = sha256_file(path) if method == "content" else str(st.st_mtime_ns)
        h.update(f"{name}\0{st.st_size}\0{third}\n".encode())
    what = {"content": "sha256 over the relative file names, sizes and sha256 of the contents",
            "stat": "sha256 over the relative file names, sizes and modification times (not the contents: "
                    "set <monitoring> data_checksum=content for a content hash)"}[method]
    return {"method": method, "description": what, "sha256": h.hexdigest(), "files": len(files), "bytes": total,
            "roots": [str(r) for r in roots]}


def dataset_record(job: Job) -> dict:
    gen = job.generator
    action = gen.action("dataset_injection")
    out = {"format": action.entry.name, "origin": action.entry.origin, "parameters": describe(action.config)}
    method = job.monitoring.data_checksum
    roots = gen.data_format().files()
    if method == "none":
        out["checksum"] = {"method": "none"}
    elif roots:
        try:
            out["checksum"] = dataset_checksum(roots, method)
        except OSError as exc:
            out["checksum"] = {"method": method, "error": str(exc)}
    else:
        params = {**describe(action.config), "seed": gen.seed}
        out["checksum"] = {"method": "parameters",
                           "description": "no files: generated from its parameters and the seed by autocnnp "
                                          "(version in software); sha256 over the canonical JSON of both",
                           "sha256": sha256_text(json.dumps(jsonable(params), sort_keys=True))}
    return out


def final_metrics(rundir: RunDir) -> dict:
    """The last row of ``metrics.csv`` (numbers as floats), {} if there is none."""
    return epoch_metrics(rundir, None)


def epoch_metrics(rundir: RunDir, epoch: int | None) -> dict:
    """The row of ``metrics.csv`` of ``epoch`` (counted from 1, as a checkpoint's epochs done; None: the last
    row), numbers as floats; {} if there is none."""
    try:
        with open(rundir.metrics, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        return {}
    rows = [row for row in rows if epoch is None or row.get("epoch") == str(epoch)]
    if not rows:
        return {}
    out = {}
    for k, v in rows[-1].items():
        try:
            out[k] = int(v) if k == "epoch" else float(v)
        except (TypeError, ValueError):
            out[k] = v
    return out


# --- the run's life cycle ---------------------------------------------------------------------------

def start(job: Job) -> dict:
    """Rank 0, before training: write everything known from the job and the machine."""
    gen = job.generator
    old = read(gen.rundir) or {}
    invocation = {"started": now(), "status": "running", "host": socket.gethostname(), "ranks": gen.world_size,
                  "argv": sys.argv, "resumed_from": None}
    manifest = {"autocnnp_manifest": FORMAT, "status": "running", "updated": now(),
                "job": job_record(gen.spec), "plan": plan_record(job), "seeds": seeds_record(gen.seed),
                "determinism": {"enabled": gen.hyperparameters.deterministic},
                "dataset": dataset_record(job), "software": software(), "hardware": hardware(gen.world_size),
                "repeats": old.get("repeats", {"count": 1}),
                "invocations": [*old.get("invocations", []), invocation], "restarts": old.get("restarts", []),
                "final_metrics": old.get("final_metrics", {})}
    write_json(gen.rundir.manifest, manifest)
    return manifest


def record_run(job: Job, run) -> None:
    """Rank 0, once the run is built: split sizes and ratios, augmentation, the checkpoint it resumed from,
    the MPI library now that MPI is up, what deterministic mode set."""
    if run.world.rank != 0:
        return
    rundir = job.rundir
    manifest = read(rundir) or start(job)
    data = run.data
    sizes = {"train": len(data.train), "valid": len(data.valid)}
    total = sum(sizes.values())
    dataset = manifest.setdefault("dataset", {})
    dataset["split"] = {"samples": sizes, "ratios": {k: round(v / total, 6) for k, v in sizes.items()} if total else {},
                        "validation": "held-out validation split scored with SegEval after every epoch"}
    dataset["in_channels"], dataset["num_classes"] = data.in_channels, data.num_classes
    dataset["classes"] = {str(i): name for i, name in enumerate(data.class_names)}
    dataset["empty_label_cases"] = {"count": len(data.empty_label_cases), "cases": list(data.empty_label_cases)}
    dataset["augmentation"] = data.augmentation
    manifest["software"]["mpi_library"] = mpi_library() or manifest["software"].get("mpi_library")
    manifest["determinism"] = run.determinism
    manifest["world"] = {"size": run.world.world_size, "backend": run.world.backend}
    manifest["invocations"][-1]["resumed_from"] = str(run.resumed_from) if run.resumed_from else None
    manifest["updated"] = now()
    write_json(rundir.manifest, manifest)


def record_failure(rundir: RunDir, reason: str, restart: int | None = None) -> None:
    """run & manage, once every rank of a failed run is gone: the run failed, and why (rank 0 may have
    recorded itself as a victim); ``restart``: the attempt about to start."""
    manifest = read(rundir)
    if manifest is None:  # rank 0 never got as far as the manifest
        return
    manifest["status"] = "failed"
    last = manifest.setdefault("invocations", [{}])[-1]
    last.update(status="failed", message=reason, finished=last.get("finished", now()))
    if restart is not None:
        manifest.setdefault("restarts", []).append({"attempt": restart, "at": now(), "after": reason})
    manifest["updated"] = now()
    write_json(rundir.manifest, manifest)


def finish(rundir: RunDir, status: str, message: str = "") -> None:
    """Rank 0, when the run ends: status, end time, final metrics."""
    manifest = read(rundir) or {}
    manifest["status"] = status
    manifest["updated"] = now()
    invocations = manifest.setdefault("invocations", [{}])
    invocations[-1].update(status=status, finished=now(), **({"message": message} if message else {}))
    manifest["final_metrics"] = final_metrics(rundir)
    write_json(rundir.manifest, manifest)


@contextlib.contextmanager
def recording(job: Job, rank: int):
    """Around a rank's training: rank 0 starts the manifest and closes it with the outcome."""
    if rank != 0:
        yield
        return
    start(job)
    rundir = job.rundir
    try:
        yield
    except BaseException as exc:
        status = outcome(exc)
        with contextlib.suppress(Exception):
            finish(rundir, status, f"{type(exc).__name__}: {exc}")
        raise
    finish(rundir, "completed")


def run_info(job: Job, launcher: str, first_step: int = 0) -> RunInfo:
    """What the trackers learn of the run: the plan flattened into params, tags, the job and plan files; the
    parent run from the environment (``run --repeat``, ``tune``)."""
    gen = job.generator
    plan = plan_record(job)
    params = _flatten({k: v for k, v in plan.items() if k != "actions"})
    for action in plan["actions"]:
        params[action["type"]] = action["implementation"]
        params.update(_flatten(action["parameters"], f"{action['type']}."))
    plan_file = gen.rundir.tracking / "plan.json"
    write_json(plan_file, plan)
    parent = os.environ.get(PARENT_RUN)
    tags = {"framework": gen.framework, "strategy": gen.action("dist_strategy").entry.name, "degree": str(gen.ranks),
            "launcher": launcher, "architecture": gen.action("architecture_injection").entry.name,
            "lr_policy": gen.action("lr_policy").entry.name, "data": gen.action("dataset_injection").entry.name}
    return RunInfo(gen.spec.file.stem, gen.rundir.root, params, tags, {"job": gen.spec.file, "plan": plan_file},
                   first_step=first_step, parent=Path(parent) if parent else None)


def _flatten(values: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


class Stragglers(Tracker):
    """The manifest as a tracker (rank 0): the ranks flagged as stragglers, as they are flagged."""

    def straggler(self, epoch: int, rank: int, step_s: float, median_s: float) -> None:
        rundir = RunDir(self.info.rundir)
        manifest = read(rundir) or {}
        manifest.setdefault("stragglers", []).append(
            {"rank": rank, "epoch": epoch + 1, "own_work_ms": round(1000 * step_s, 2), "median_ms": round(1000 * median_s, 2)})
        write_json(rundir.manifest, manifest)
