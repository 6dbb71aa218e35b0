"""`autocnnp deploy`: the job, the files it names and (optionally) autocnnp itself, into a shared folder
keyed by content; a second deploy copies only what changed; --dry-run writes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from jobfiles import strategy_module, write_job

from autocnnp.run.deploy import job_tree

PLUGIN = "def Note(epoch, metrics, state):\n    pass\n"
ARCH = "import torch.nn as nn\n\ndef build(in_channels, num_classes):\n    return nn.Conv2d(in_channels, num_classes, 1)\n"


def make_job(root: Path) -> Path:
    """A job in root/jobs/ naming a plug-in next to it, an architecture in a sibling folder and a hostfile."""
    (root / "jobs").mkdir(parents=True)
    (root / "shared").mkdir()
    (root / "jobs" / "note.py").write_text(PLUGIN)
    (root / "shared" / "net.py").write_text(ARCH)
    (root / "jobs" / "hosts").write_text("localhost slots=2\n")
    ckpt = ('<action class="extensible" type="checkpoint"><value>periodic</value>'
            '<value name="Note"><path>note.py</path></value></action>')
    return write_job(root / "jobs" / "job.xml", output="runs/out", arch='<CNN_archi><path>../shared/net.py</path></CNN_archi>',
                     actions=strategy_module(extra=ckpt),
                     extra='<cluster><property name="hostfile">hosts</property></cluster>')


def lines(out: str) -> list[str]:
    return [ln.strip() for ln in out.splitlines() if ln.startswith("  ")]


def test_deploy_copies_once_then_only_what_changed(cli, tmp_path):
    job, store = make_job(tmp_path / "src"), tmp_path / "shared-fs"

    rc, out, err = cli("deploy", job, "--to", store, "--dry-run")
    assert (rc, err) == (0, "")
    assert sorted(lines(out)) == sorted([f"would copy   jobs/job.xml ({job.stat().st_size} bytes)",
                                         f"would copy   jobs/note.py ({len(PLUGIN)} bytes)",
                                         f"would copy   shared/net.py ({len(ARCH)} bytes)",
                                         "would copy   jobs/hosts (18 bytes)"])
    assert not store.exists()  # a dry run writes nothing

    rc, out, _ = cli("deploy", job, "--to", store)
    assert rc == 0 and "job: 4 copied" in out
    tree = job_tree(store, job)
    deployed = tree / "jobs" / "job.xml"
    assert deployed.read_text() == job.read_text()
    assert (tree / "shared" / "net.py").read_text() == ARCH  # ../shared/net.py still resolves from the copy
    manifest = json.loads((tree / ".deploy.json").read_text())["files"]
    assert sorted(manifest) == ["jobs/hosts", "jobs/job.xml", "jobs/note.py", "shared/net.py"]
    for rel, sha in manifest.items():  # every deployed file is its content's object
        assert os.path.samefile(tree / rel, store / "objects" / sha[:2] / sha)
    rc, out, _ = cli("validate", deployed)
    assert rc == 0, out

    rc, out, _ = cli("deploy", job, "--to", store)  # nothing changed: nothing copied
    assert rc == 0 and lines(out) == [] and "job: 0 copied (0 bytes), 0 linked (content already there), " \
        "4 unchanged, 0 removed" in out

    (tmp_path / "src" / "jobs" / "note.py").write_text(PLUGIN + "# v2\n")
    rc, out, _ = cli("deploy", job, "--to", store, "--dry-run")
    assert lines(out) == [f"would copy   jobs/note.py ({len(PLUGIN) + 5} bytes)"]
    assert (tree / "jobs" / "note.py").read_text() == PLUGIN
    rc, out, _ = cli("deploy", job, "--to", store)
    assert lines(out) == [f"copy   jobs/note.py ({len(PLUGIN) + 5} bytes)"] and "3 unchanged" in out
    assert (tree / "jobs" / "note.py").read_text() == PLUGIN + "# v2\n"

    # back to the first version: its content is still in the store, so it is linked, not copied
    (tmp_path / "src" / "jobs" / "note.py").write_text(PLUGIN)
    rc, out, _ = cli("deploy", job, "--to", store)
    assert lines(out) == ["link   jobs/note.py (content already deployed)"]


def test_files_the_job_no_longer_names_leave_the_deployment_but_outputs_stay(cli, tmp_path):
    job, store = make_job(tmp_path / "src"), tmp_path / "shared-fs"
    assert cli("deploy", job, "--to", store)[0] == 0
    tree = job_tree(store, job)
    (tree / "jobs" / "runs" / "out").mkdir(parents=True)
    (tree / "jobs" / "runs" / "out" / "metrics.csv").write_text("epoch\n0\n")
    job.write_text(job.read_text().replace('<property name="hostfile">hosts</property>', ""))
    rc, out, _ = cli("deploy", job, "--to", store)
    assert rc == 0 and "remove jobs/hosts (no longer part of the deployment)" in out
    assert not (tree / "jobs" / "hosts").exists()
    assert (tree / "jobs" / "runs" / "out" / "metrics.csv").exists()


def test_deploy_with_the_package_runs_from_the_shared_folder(cli, tmp_path):
    job, store = make_job(tmp_path / "src"), tmp_path / "shared-fs"
    rc, out, _ = cli("deploy", job, "--to", store, "--with-package")
    assert rc == 0
    lib = store / "lib"
    for rel in ("autocnnp/__init__.py", "autocnnp/run/deploy.py", "autocnnp/components/__init__.py",
                "autocnnp/templates/sbatch.sh", "autocnnp/templates/job.xml", "autocnnp/engine/schema/job.xsd"):
        assert (lib / rel).is_file(), rel
    assert not list(lib.rglob("__pycache__"))
    deployed = job_tree(store, job) / "jobs" / "job.xml"
    assert f"PYTHONPATH={lib} " in out and str(deployed) in out
    # a node with only the deployed copy: the package and the job come from the shared folder
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI_", "SLURM_"))}
    code = ("import autocnnp, autocnnp.components, sys; from autocnnp.cli import main; "
            "print(autocnnp.__file__, autocnnp.components.__file__); sys.exit(main(['validate', sys.argv[1]]))")
    proc = subprocess.run([sys.executable, "-c", code, str(deployed)], capture_output=True, text=True,
                          env={**env, "PYTHONPATH": str(lib)}, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0].split()
    assert first == [str(lib / "autocnnp" / "__init__.py"), str(lib / "autocnnp" / "components" / "__init__.py")]
    assert f"{deployed}: valid" in proc.stdout
    rc, out, _ = cli("deploy", job, "--to", store, "--with-package")
    assert "package: 0 copied (0 bytes), 0 linked (content already there)" in out


@pytest.mark.parametrize("setup,problem", [
    ("file", "is not a folder"),
    ("none", "no folder to deploy to"),
])
def test_deploy_target_problems(cli, tmp_path, setup, problem):
    job = make_job(tmp_path / "src")
    args = ["deploy", job]
    if setup == "file":
        (tmp_path / "afile").write_text("")
        args += ["--to", tmp_path / "afile"]
    rc, _, err = cli(*args)
    assert rc == 2 and problem in err and "Hint:" in err


def test_deploy_dir_from_the_cluster_section(cli, tmp_path):
    job = write_job(tmp_path / "job.xml", extra=f'<cluster><property name="deploy_dir">{tmp_path / "d"}</property>'
                    '</cluster>')
    rc, out, _ = cli("deploy", job)
    assert rc == 0 and (job_tree(tmp_path / "d", job) / "job.xml").read_text() == job.read_text()


def test_a_broken_job_is_not_deployed(cli, tmp_path):
    job = write_job(tmp_path / "job.xml", degree=0)
    rc, _, err = cli("deploy", job, "--to", tmp_path / "d")
    assert rc == 2 and "parallelism-degree" in err and not (tmp_path / "d").exists()
