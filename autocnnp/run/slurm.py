"""Slurm: render an sbatch script for a job, submit it, follow it and cancel it (torch-free).

``autocnnp submit JOB.xml`` checks everything it can before anything is queued (setup lines that
parse, sbatch present, controller answering, partition known and with usable nodes, resources Slurm
can grant, checked with ``sbatch --test-only``, no earlier submission or run still writing to its
output folder, and what ``autocnnp run`` checks before the ranks start: framework, output folder,
pretrained model, data, a minibatch per rank), then renders ``templates/sbatch.sh`` and submits it.
The job id goes to ``<output>/slurm/job.json``; ``autocnnp status`` and ``autocnnp cancel`` read it
(given a job id, they find the run folder from its batch script). Inside the allocation the script runs
``autocnnp run --launcher mpirun|srun JOB``: run & manage starts the ranks and watches them.
"""

from __future__ import annotations

import math
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources as importlib_resources
from pathlib import Path
from string import Template

from ..core.errors import ExitCode, JobError, Source, did_you_mean
from ..core.files import read_json, write_json
from ..core.metrics import DICE, TRAIN_LOSS, VALID_LOSS
from ..core.rundir import RunDir
from .job import Job, load_job
from .lock import is_held, own_output
from .preflight import check_framework, check_inputs, check_output

ACTIVE = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING", "STAGE_OUT",
          "SIGNALING", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "STOPPED")
# sinfo %T states of a node that can take no job
UNUSABLE = ("down", "drain", "drained", "draining", "fail", "failing", "future", "inval", "maint", "unknown",
            "not_responding", "power_down", "powered_down", "powering_down", "reboot_issued", "unk")
TIME_LIMIT = re.compile(r"^(\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}|unlimited|infinite)$", re.I)
NO_SLURM_HINT = ("submit from a Slurm login node (Debian: apt-get install slurm-client), start the local test "
                 "cluster with cluster/slurm/start.sh, or train without Slurm: autocnnp run JOB.xml")


@dataclass(frozen=True)
class Resources:
    """What the sbatch script asks Slurm for."""

    nodes: int
    ntasks: int
    tasks_per_node: int
    cpus_per_task: int
    gpus_per_task: int
    time_limit: str
    partition: str
    account: str
    job_name: str
    output: Path
    launcher: str


def resources(job: Job) -> Resources:
    """The allocation for the job; impossible combinations are refused here, before Slurm is asked."""
    c, world_size, where = job.slurm, job.world_size, job.where
    if c.nodes > world_size:
        raise JobError(where("nodes"), f"the job asks for {c.nodes} nodes but has only {world_size} ranks "
                       "(parallelism-degree), so some nodes would stay empty",
                       f"set nodes to at most {world_size} or raise parallelism-degree")
    per_node = c.tasks_per_node or math.ceil(world_size / c.nodes)
    if per_node * c.nodes < world_size:
        raise JobError(where("tasks_per_node"), f"{c.nodes} node(s) x {per_node} tasks per node hold "
                       f"{per_node * c.nodes} ranks, fewer than parallelism-degree {world_size}",
                       f"set tasks_per_node to {math.ceil(world_size / c.nodes)} or more, or raise nodes")
    if per_node * (c.nodes - 1) >= world_size:
        raise JobError(where("tasks_per_node"), f"{world_size} ranks at {per_node} per node fill fewer than "
                       f"the {c.nodes} nodes asked for", f"lower nodes to {math.ceil(world_size / per_node)}")
    if not TIME_LIMIT.match(c.time_limit.strip()):
        raise JobError(where("time_limit"), f"'{c.time_limit}' is not a Slurm time limit",
                       "write minutes, HH:MM:SS or D-HH:MM:SS, for example 02:00:00")
    if re.fullmatch(r"[0:-]+", c.time_limit.strip()):
        raise JobError(where("time_limit"), f"time limit '{c.time_limit}' is zero, which Slurm takes as no limit",
                       "write the wall-clock time the job needs (e.g. 02:00:00), or 'unlimited' if that is meant")
    if c.mem and not re.fullmatch(r"\d+[KMGT]?", c.mem.strip(), re.I):
        raise JobError(where("mem"), f"mem '{c.mem}' is not a Slurm memory size",
                       "write a number with an optional unit K, M, G or T, e.g. 32G (0: all of a node's memory)")
    for name in ("partition", "account", "job_name"):
        value = getattr(c, name)
        if value and not re.fullmatch(r"[\w.+-]+", value):
            raise JobError(where(name), f"{name} '{value}' has characters Slurm names never have",
                           "use letters, digits, '.', '_', '+' or '-'")
    launcher = job.launch.launcher if job.launch.launcher in ("mpirun", "srun") else "mpirun"
    output = Path(c.slurm_output)
    output = output if output.is_absolute() else job.rundir.root / output
    return Resources(c.nodes, world_size, per_node, c.cpus_per_task, c.gpus_per_task, c.time_limit.strip(),
                     c.partition, c.account, c.job_name or f"autocnnp-{job.spec.file.stem}", output, launcher)


def limit_seconds(text: str) -> int | None:
    """A Slurm time limit (minutes, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in seconds; None when unlimited."""
    text = text.strip().lower()
    if text in ("unlimited", "infinite"):
        return None
    days, _, rest = text.rpartition("-")
    parts = [int(x) for x in rest.split(":")]
    if days:  # D-H, D-H:M, D-H:M:S
        h, m, sec = (parts + [0, 0])[:3]
        return ((int(days) * 24 + h) * 60 + m) * 60 + sec
    if len(parts) == 3:
        return (parts[0] * 60 + parts[1]) * 60 + parts[2]
    return parts[0] * 60 + (parts[1] if len(parts) == 2 else 0)


def render(job: Job, res: Resources) -> str:
    """The sbatch script (``templates/sbatch.sh`` filled in)."""
    q = shlex.quote
    directives = [f"--job-name={res.job_name}", f"--nodes={res.nodes}", f"--ntasks={res.ntasks}",
                  f"--ntasks-per-node={res.tasks_per_node}", f"--cpus-per-task={res.cpus_per_task}",
                  f"--time={res.time_limit}", f"--output={res.output}", f"--chdir={job.spec.base_dir}"]
    if res.gpus_per_task:
        directives.append(f"--gpus-per-task={res.gpus_per_task}")
    if res.partition:
        directives.append(f"--partition={res.partition}")
    if res.account:
        directives.append(f"--account={res.account}")
    c = job.slurm
    directives += [f"--mem={c.mem.strip()}"] if c.mem else []
    directives += ["--exclusive"] if c.exclusive else []
    # the warning goes to the batch shell (B:), which passes it to run & manage: stop with a checkpoint; a
    # warning as early as the limit (a short test job with the default 300 s) would stop the job as it starts
    limit = limit_seconds(res.time_limit)
    lead = min(c.signal_before_s, limit // 2) if limit else c.signal_before_s
    directives += [f"--signal=B:USR1@{lead}"] if lead else []
    directives += ["--requeue", "--open-mode=append"] if c.requeue else []  # one log for every start
    directives += shlex.split(c.sbatch_args)
    rundir = job.rundir
    text = importlib_resources.files("autocnnp.templates").joinpath("sbatch.sh").read_text()
    return Template(text).substitute(
        job=q(str(job.spec.file)), job_name=res.job_name,
        sets="".join(f" {q(f'--set={k}={v}')}" for k, v in job.spec.overrides.items()), ntasks=res.ntasks,
        nodes=res.nodes, launcher=res.launcher, python=q(sys.executable), output=q(str(rundir)),
        exit_dir=q(str(rundir.slurm)), workdir=q(str(job.spec.base_dir)),
        setup="\n".join(f"{_grouped(line)} || setup_failed {n} $? {q(line)}" for n, line in _setup_lines(c.setup))
        or "# (no setup lines)",
        requeue="true" if c.requeue else "false", stopped=int(ExitCode.STOPPED), bad_input=int(ExitCode.BAD_INPUT),
        directives="\n".join(f"#SBATCH {d}" for d in directives))


def _setup_lines(setup: str) -> list[tuple[int, str]]:
    """(number, command) of each non-empty line of the setup property; a line may hold ';'."""
    return list(enumerate((line.strip() for line in setup.splitlines() if line.strip()), 1))


def _grouped(line: str) -> str:
    """A setup line run in this shell (module load, export), ended by a newline: a trailing comment or ';'
    stays harmless."""
    return f"{{ {line}\n}}"


def check_setup(job: Job) -> None:
    """Each setup line is a complete shell command (bash -n), so the batch script cannot fail to parse."""
    for number, line in _setup_lines(job.slurm.setup):
        proc = _call(["bash", "-n"], stdin=_grouped(line))
        if proc.returncode != 0:
            why = re.sub(r"^bash: (line \d+: )?", "", (proc.stderr.strip().splitlines() or ["bash -n fails"])[0])
            raise JobError(job.where("setup"), f"setup line {number} `{line}` is not a complete shell command ({why})",
                           "write one whole command per line; join the parts of an if/for/while with ';'")


def _call(cmd: list[str], timeout: float = 30, stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run a Slurm client command; a missing binary or a hung controller become a CompletedProcess too."""
    try:
        return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        return subprocess.CompletedProcess(cmd, 127, "", f"{cmd[0]}: command not found")
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, 124, "", f"{cmd[0]} got no answer within {timeout:g} s")


def _first_error(proc: subprocess.CompletedProcess) -> str:
    lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
    text = lines[-1] if lines else f"exit code {proc.returncode}"
    return re.sub(r"^(sbatch|sinfo|squeue|scontrol|scancel|sacct): (error: )?", "", text).rstrip(".")


def _partitions(job: Job) -> dict[str, dict]:
    """partition -> {'default', 'up', 'nodes': [(state, count)]} from sinfo; the controller must answer."""
    proc = _call(["sinfo", "-h", "-o", "%P|%a|%T|%D"])
    if proc.returncode != 0:
        raise JobError(job.spec.where, f"the Slurm controller does not answer: {_first_error(proc)}",
                       "check `sinfo` on this machine; for the local test cluster run cluster/slurm/start.sh")
    parts: dict[str, dict] = {}
    for line in proc.stdout.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 4:
            continue
        name, avail, state, count = fields
        info = parts.setdefault(name.rstrip("*"), {"default": name.endswith("*"), "up": avail == "up", "nodes": []})
        info["nodes"].append((state, int(count or 0)))
    return parts


def _usable(state: str) -> bool:
    s = state.lower().rstrip("*~#!%$@^-")
    return not any(s.startswith(u) for u in UNUSABLE) and not state.endswith("*")


def preflight(job: Job, res: Resources) -> str:
    """Everything that can be checked before submitting; returns the partition the job goes to."""
    where = job.where
    if shutil.which("sbatch") is None:
        raise JobError(job.spec.where, "sbatch is not installed here (no Slurm client on this machine)", NO_SLURM_HINT)
    parts = _partitions(job)
    if not parts:
        raise JobError(job.spec.where, "the Slurm cluster has no partitions", "ask its administrator")
    name = res.partition
    if name and name not in parts:
        raise JobError(where("partition"), f"unknown Slurm partition '{name}'", did_you_mean(name, parts))
    if not name:
        defaults = [p for p, info in parts.items() if info["default"]]
        if not defaults:
            raise JobError(where("partition"), "the job names no partition and the cluster has no default one",
                           "set <property name=\"partition\"> (or --partition) to one of: " + ", ".join(sorted(parts)))
        name = defaults[0]
    info = parts[name]
    if not info["up"]:
        raise JobError(where("partition"), f"Slurm partition '{name}' is not up (it takes no jobs now)",
                       "choose another partition or ask the administrator")
    usable = sum(n for state, n in info["nodes"] if _usable(state))
    if usable < res.nodes:
        states = ", ".join(f"{n} {state}" for state, n in info["nodes"])
        raise JobError(where("nodes"), f"the job needs {res.nodes} node(s) but partition '{name}' has "
                       f"{usable} that can run jobs ({states})",
                       "lower nodes, pick another partition, or bring the nodes back (scontrol update "
                       "nodename=... state=resume)")
    rundir = job.rundir
    earlier = read_json(rundir.slurm_record)
    if earlier:
        state = job_state(earlier["job_id"], rundir)
        if state.state in ACTIVE:
            raise JobError(job.spec.where, f"Slurm job {earlier['job_id']} from an earlier submit of this job is "
                           f"{state.state} and writes to the same output folder {rundir}",
                           f"wait for it, cancel it (autocnnp cancel {job.spec.file}), or change <output>")
    return name


def submit(job: Job, dry_run: bool = False, out=None) -> str | None:
    """Check, render and submit; returns the Slurm job id (None for a dry run). Raises JobError, submitting
    nothing, when Slurm would refuse the job."""
    out = out or sys.stdout
    res = resources(job)
    check_setup(job)
    script = render(job, res)
    if dry_run:
        out.write(script)
        return None
    partition = preflight(job, res)
    test = _call(["sbatch", "--test-only"], stdin=script)
    if test.returncode != 0:
        asked = (f"nodes={res.nodes}, ntasks={res.ntasks}, tasks_per_node={res.tasks_per_node}, "
                 f"cpus_per_task={res.cpus_per_task}, gpus_per_task={res.gpus_per_task}, time_limit={res.time_limit}")
        raise JobError(job.where("nodes"), f"Slurm refuses this job in partition '{partition}': "
                       f"{_first_error(test)} (asked for {asked})",
                       f"compare with what the partition offers (sinfo -p {partition} -o '%N %c %G %l') "
                       "and lower the request")
    rundir = job.rundir
    # what `autocnnp run` checks in the front-end, but the slots (the allocation's, checked above): done in
    # the batch script, a refusal would come after the wait in the queue
    with own_output(job, front_end=True):
        check_framework(job)
        check_output(job)
        check_inputs(job)
    folder = rundir.slurm
    folder.mkdir(parents=True, exist_ok=True)
    res.output.parent.mkdir(parents=True, exist_ok=True)  # Slurm does not create the log's folder
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = folder / f"sbatch-{stamp}.sh"
    path.write_text(script)
    proc = _call(["sbatch", "--parsable", str(path)], timeout=60)
    if proc.returncode != 0 or not proc.stdout.strip():
        path.unlink(missing_ok=True)
        raise JobError(job.spec.where, f"sbatch refused the job: {_first_error(proc)}", "nothing was submitted; "
                       "fix the cause and submit again")
    job_id = proc.stdout.strip().split(";")[0]
    sets = "".join(f" --set {shlex.quote(f'{k}={v}')}" for k, v in job.spec.overrides.items())
    record = {"job_id": job_id, "job_file": str(job.spec.file), "script": str(path), "partition": partition,
              "log": str(res.output).replace("%j", job_id), "output": str(rundir), "ntasks": res.ntasks,
              "nodes": res.nodes, "launcher": res.launcher,
              "submitted": datetime.now(UTC).isoformat(timespec="seconds")}
    try:
        write_json(rundir.slurm_record, record)
    except OSError as exc:  # no record means nobody could follow the job: do not leave it queued
        _call(["scancel", job_id])
        raise JobError(job.spec.where, f"could not record Slurm job {job_id} in {folder}: {exc}; it was cancelled",
                       "make the output folder writable and submit again") from None
    print(f"submitted Slurm job {job_id} ({res.ntasks} ranks on {res.nodes} node(s), partition {partition}, "
          f"launcher {res.launcher})\n  log: {record['log']}\n  follow: autocnnp status{sets} {job.spec.file}", file=out)
    return job_id


@dataclass(frozen=True)
class JobState:
    state: str  # Slurm's word (PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, ...) or UNKNOWN
    exit_code: str = ""
    elapsed: str = ""
    reason: str = ""
    nodes: str = ""
    source: str = ""  # which of scontrol, sacct or the job's exit file told

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


def job_state(job_id: str, rundir: RunDir | None = None) -> JobState:
    """The state of Slurm job ``job_id``: from the controller while it remembers the job, then from
    accounting (sacct) where the cluster keeps it, then from the exit code the batch script left."""
    proc = _call(["scontrol", "show", "job", "-o", str(job_id)])
    if proc.returncode == 0 and "JobState=" in proc.stdout:
        kv = dict(re.findall(r"(\w+)=(\S*)", proc.stdout))
        return JobState(kv.get("JobState", "UNKNOWN"), kv.get("ExitCode", ""), kv.get("RunTime", ""),
                        kv.get("Reason", ""), kv.get("NodeList", ""), "scontrol")
    proc = _call(["sacct", "-n", "-P", "-X", "-j", str(job_id), "-o", "State,ExitCode,Elapsed,NodeList"])
    if proc.returncode == 0 and proc.stdout.strip():
        state, code, elapsed, nodes = (proc.stdout.strip().splitlines()[0].split("|") + [""] * 4)[:4]
        return JobState(state.split()[0], code, elapsed, "", nodes, "sacct")
    if rundir is not None:
        try:
            code = int(rundir.slurm_exit(job_id).read_text().strip())
        except (OSError, ValueError):
            pass
        else:
            return JobState("COMPLETED" if code == 0 else "FAILED", f"{code}:0", source="exit file")
    return JobState("UNKNOWN")


def srun_command(job: Job, worker: list[str], env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """``srun`` starting one task per rank; Open MPI (and mpi4py) in the tasks wire up over PMIx."""
    c = job.slurm
    cmd = ["srun", f"--ntasks={job.world_size}", f"--cpus-per-task={c.cpus_per_task}", "--kill-on-bad-exit=1"]
    if c.gpus_per_task:
        cmd.append(f"--gpus-per-task={c.gpus_per_task}")
    if "SLURM_JOB_ID" not in env:  # outside an allocation srun makes one: ask for it as sbatch would
        cmd += [f"--nodes={c.nodes}", f"--time={c.time_limit}"]
        cmd += [f"--partition={c.partition}"] if c.partition else []
        cmd += [f"--account={c.account}"] if c.account else []
    if c.cpus_per_task > 1:
        env.setdefault("OMP_NUM_THREADS", str(c.cpus_per_task))
    env.setdefault("SLURM_MPI_TYPE", "pmix")  # Debian/Ubuntu Open MPI is built with PMIx, not Slurm's PMI-2
    return cmd + worker, env


def check_srun(job: Job) -> None:
    if shutil.which("srun") is None:
        raise JobError(job.where("launcher"), "launcher 'srun' is asked for, but srun is not installed here",
                       "run inside a Slurm allocation (autocnnp submit JOB.xml) or use launcher mpirun")


def find_job(target: str, sets: list[str] | None = None) -> tuple[str, RunDir | None]:
    """(job id, run folder) from a job file (its recorded submission; ``sets``: the ``--set`` overrides it
    was submitted with) or a bare Slurm job id (the run folder of its batch script, if submit wrote it)."""
    if re.fullmatch(r"\d+", target):
        return target, _submitted_from(target)
    job = load_job(target, sets)
    rundir = job.rundir
    record = read_json(rundir.slurm_record)
    if record is None:
        raise JobError(job.spec.where, f"this job was never submitted to Slurm (no {rundir.slurm_record})",
                       f"submit it first: autocnnp submit {job.spec.file}")
    return record["job_id"], rundir


def _submitted_from(job_id: str) -> RunDir | None:
    """The run folder of a job ``autocnnp submit`` queued: its batch script is ``<output>/slurm/sbatch-*.sh``
    and its job.json names the job; None for another job, or one the controller has forgotten."""
    proc = _call(["scontrol", "show", "job", "-o", job_id])
    script = re.search(r"\bCommand=(\S+)", proc.stdout) if proc.returncode == 0 else None
    if script is None:
        return None
    rundir = RunDir(Path(script.group(1)).parent.parent)
    return rundir if (read_json(rundir.slurm_record) or {}).get("job_id") == job_id else None


def progress(rundir: RunDir | None) -> str:
    """The last epoch line of the job's metrics.csv, if training got that far."""
    if rundir is None:
        return ""
    try:
        lines = rundir.metrics.read_text().strip().splitlines()
    except OSError:
        return ""
    if len(lines) < 2:
        return ""
    row = dict(zip(lines[0].split(","), lines[-1].split(",")))
    extra = ", ".join(f"{k} {float(row[k]):.4g}" for k in (TRAIN_LOSS, VALID_LOSS, DICE) if row.get(k))
    return f"epoch {row.get('epoch', '?')} done" + (f": {extra}" if extra else "")


def wait(job_id: str, rundir: RunDir | None, timeout_s: float, poll_s: float = 1.0) -> JobState:
    """Poll until the job leaves the queue (or ``timeout_s`` passes); returns its last known state."""
    deadline = time.monotonic() + timeout_s
    state = job_state(job_id, rundir)
    while state.active and time.monotonic() < deadline:
        time.sleep(poll_s)
        state = job_state(job_id, rundir)
    return state


def cancel(job_id: str, rundir: RunDir | None, wait_s: float = 60) -> tuple[JobState, JobState]:
    """scancel the job if it is still queued or running and wait until it has left the queue and its
    run & manage has released the output folder (its ranks are gone); returns (state before, after)."""
    before = job_state(job_id, rundir)
    if not before.active:
        return before, before
    proc = _call(["scancel", str(job_id)])
    if proc.returncode != 0:
        raise JobError(Source(Path(job_id), text=f"Slurm job {job_id}"), f"scancel failed: {_first_error(proc)}",
                       "check the job with squeue and that you own it")
    deadline = time.monotonic() + wait_s
    after = wait(job_id, rundir, wait_s)
    while rundir is not None and is_held(rundir) and time.monotonic() < deadline:
        time.sleep(0.2)
    return before, after
