"""The ``autocnnp`` command line: validate, plan and new on the shipped jobs; exit codes; no torch."""

from __future__ import annotations

import csv
import dataclasses
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import BASE_JOB, DEMO, ROOT, TEMPLATE

from autocnnp.generator.assemble import assemble
from autocnnp.generator.points import POINTS

SHIPPED = pytest.mark.parametrize("path", [DEMO, TEMPLATE], ids=["demo", "template"])


@SHIPPED
def test_validate_shipped_jobs(cli, path):
    rc, out, err = cli("validate", path)
    assert (rc, err) == (0, "")
    assert out == f"{path}: valid (imaging_segmentation, 2 ranks, ring_allreduce, unet)\n"


@SHIPPED
def test_plan_shipped_jobs(cli, path):
    rc, out, err = cli("plan", path)
    assert (rc, err) == (0, "")
    gen = assemble(path)
    lines = out.splitlines()
    assert lines[0] == f"job: {path}"
    assert "task: imaging_segmentation   parallelism-degree: 2   seed: 0" in lines
    for point in POINTS:  # every action with its implementation and where it comes from
        action = gen.action(point.type)
        assert re.search(rf"^\s+- {point.type} \[(non-)?extensible\] = {action.entry.name}  \(built-in[,)]",
                         out, re.M), point.type
    assert "- dist_strategy [extensible] = ring_allreduce  (built-in)" in out
    assert "- communication_init [non-extensible] = torch_distributed  (built-in, default)" in out
    hyper = lines[lines.index("hyperparameters:") + 1:lines.index("launch:") - 1]
    fields = [f.name for f in dataclasses.fields(gen.hyperparameters)]
    assert [h.split(" = ")[0].strip() for h in hyper] == fields
    assert hyper == [f"  {k} = {v}" for k, v in dataclasses.asdict(gen.hyperparameters).items()]
    launch = lines[lines.index("launch:") + 1]
    assert launch.startswith("  mpirun -np 2 ")
    assert launch.endswith(f"-m autocnnp.run.worker {path}")


def test_plan_launch_line_follows_degree_and_launcher(cli, job):
    rc, out, _ = cli("plan", job(("<parallelism-degree>2<", "<parallelism-degree>4<")))
    assert rc == 0 and "  mpirun -np 4 " in out
    inplace = '</hyperparameters>\n<cluster><property name="launcher">inplace</property></cluster>'
    path = job(("</hyperparameters>", inplace), name="inplace.xml")
    rc, out, _ = cli("plan", path)
    launch = out.splitlines()[-1]
    assert rc == 0 and "mpirun" not in launch and launch.endswith(f"-m autocnnp.run.worker {path}")


def test_new_writes_a_job_that_validates_and_is_not_overwritten(cli, tmp_path):
    target = tmp_path / "mine.xml"
    rc, out, err = cli("new", target)
    assert (rc, err) == (0, "") and f"wrote {target}" in out
    assert target.read_text() == TEMPLATE.read_text()
    assert cli("validate", target)[0] == 0
    assert cli("plan", target)[0] == 0

    target.write_text("my edits")
    rc, out, err = cli("new", target)
    assert (rc, out) == (2, "")
    assert err.count("\n") == 1 and err.startswith(f"autocnnp: {target}:") and "exists already" in err
    assert "Hint: choose another name or pass --force." in err
    assert target.read_text() == "my edits"

    rc, out, err = cli("new", target, "--force")
    assert (rc, err) == (0, "") and target.read_text() == TEMPLATE.read_text()


@pytest.mark.ranks
def test_the_starter_job_learns_as_written(tmp_path):
    """A newcomer's first job: `autocnnp new`, `validate`, `run` as written reaches foreground Dice 0.5."""
    def autocnnp(*argv):
        return subprocess.run([sys.executable, "-m", "autocnnp", *argv], cwd=tmp_path, capture_output=True,
                              text=True, timeout=600)

    for argv in (["new", "job.xml"], ["validate", "job.xml"], ["run", "job.xml"]):
        done = autocnnp(*argv)
        assert done.returncode == 0, done.stderr[-2000:]
    with open(tmp_path / "runs" / "my-job" / "metrics.csv") as f:
        dice = [float(row["dice_fg"]) for row in csv.DictReader(f)]
    assert dice[-1] >= 0.5 and dice[-1] > dice[0], dice  # it learned


def test_new_default_name_in_current_folder(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli("new")[0] == 0
    assert (tmp_path / "job.xml").is_file()
    rc, _, err = cli("validate", "job.xml")
    assert rc == 0, err


def test_relative_job_path_output_under_the_job_folder(cli, tmp_path, monkeypatch):
    (tmp_path / "jobs").mkdir()
    cli("new", tmp_path / "jobs" / "a.xml")
    monkeypatch.chdir(tmp_path)
    rc, out, _ = cli("plan", "jobs/a.xml")
    assert rc == 0 and f"output: {tmp_path / 'jobs' / 'runs' / 'my-job'}" in out


def test_usage_errors_exit_2(capsys):
    from autocnnp.cli import main

    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["frobnicate", "x.xml"])
    assert info.value.code == 2


def _python(*args, timeout=60):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI_", "SLURM_"))}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_process_exit_code_and_single_line_on_bad_job(tmp_path):
    bad = tmp_path / "bad.xml"
    bad.write_text(BASE_JOB.replace(">SGD<", ">sgdd<"))
    proc = _python("-m", "autocnnp", "validate", str(bad))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert re.match(rf"autocnnp: {re.escape(str(bad))}:\d+:\d+: 'sgdd' is not a valid optimizer\. "
                    r"Hint: did you mean 'sgd'\?$", proc.stderr.strip())


@pytest.mark.parametrize("leaves", ["atexit.register(work)", "threading.Thread(target=work).start()"],
                         ids=["exit-function", "thread"])
def test_a_stop_signal_while_the_process_exits_ends_it_with_one_line_and_128_plus_n(leaves):
    """Ctrl-C or SIGTERM once the command returned, while the process exits (a library's work on the way out: a
    gRPC server's grace, a thread joined, torch's teardown), ends it as during the command: 128+N and one line,
    never a traceback, a death by the signal (the federation server after its last round: -2) nor exit 0."""
    code = ("import atexit, os, sys, threading, time\nimport autocnnp.cli as cli\n"
            "def work():\n"
            "    os.write(1, b'exiting\\n')\n"
            "    time.sleep(10)\n"
            f"cli.cmd_components = lambda args: ({leaves}, 0)[1]\n"
            "sys.argv = ['autocnnp', 'components']\nsys.exit(cli.main())\n")
    for sig in (signal.SIGINT, signal.SIGTERM):
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        try:
            assert proc.stdout.readline() == "exiting\n"
            proc.send_signal(sig)
            sent = time.monotonic()
            _, err = proc.communicate(timeout=30)
        finally:
            proc.kill()
        assert (proc.returncode, err) == (128 + sig, f"autocnnp: interrupted by {sig.name}\n")
        assert time.monotonic() < sent + 5  # at once, not once the work is done


@pytest.mark.parametrize("command", ["validate", "plan"])
def test_validate_and_plan_do_not_import_torch(command):
    proc = _python("-X", "importtime", "-m", "autocnnp", command, "xml_configs/demo.xml")
    assert proc.returncode == 0, proc.stderr
    assert "import time:" in proc.stderr  # -X importtime really reported
    assert [line for line in proc.stderr.splitlines() if "torch" in line] == []


# what `autocnnp validate` must never import: the frameworks and heavy libraries, and the standard modules of
# the commands that serve, train and spawn (the dashboard's http.client, process pools, sockets; content hashes'
# OpenSSL bindings): validate's 150 ms budget (benchmarks/validate_speed.py) has no room for them
NOT_FOR_VALIDATE = {"torch", "tensorflow", "keras", "mlflow", "matplotlib", "http.client", "urllib.request",
                    "multiprocessing", "concurrent.futures", "socket", "hashlib"}


@pytest.mark.parametrize("path", sorted((ROOT / "xml_configs").glob("*.xml")), ids=lambda p: p.stem)
def test_validate_imports_no_framework_nor_heavy_module(path):
    proc = _python("-X", "importtime", "-m", "autocnnp", "validate", str(path))
    assert proc.returncode in (0, 2), proc.stderr  # 2: the example's dataset is not on this machine
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "autocnnp.cli" in imported  # -X importtime really reported
    assert {name for name in imported if name.split(".")[0] in NOT_FOR_VALIDATE or name in NOT_FOR_VALIDATE} == set()


def test_validate_data_checks_every_dataset_file(cli, tmp_path):
    from autocnnp.data.synth import write_synthetic_dataset

    root = write_synthetic_dataset(tmp_path / "data" / "Task01_BrainTumour", cases=3, shape=(24, 24, 8))
    job = tmp_path / "job.xml"
    job.write_text((ROOT / "xml_configs" / "brain_tumour_unet.xml").read_text())
    rc, out, _ = cli("validate", "--data", job)
    assert rc == 0 and "0 problem(s)" in out
    broken = sorted((root / "labelsTr").iterdir())[1]
    broken.write_bytes(broken.read_bytes()[:40])  # truncated NIfTI
    rc, out, err = cli("validate", "--data", job)
    assert rc == 2 and "1 problem(s)" in out
    assert broken.name in err and "Hint:" in err
