"""k-fold studies (``autocnnp study``), export to ONNX and int8 (``autocnnp export``)."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from jobfiles import QUIET, TINY_UNET, write_job

from autocnnp.core.errors import DataError
from autocnnp.data import folds
from autocnnp.data.synth import write_synthetic_dataset

DATA = ('<data format="decathlon"><train><path>data</path></train><test><path>data</path></test>'
        '<param name="slices_per_volume">4</param><param name="size">16</param><param name="folds">2</param></data>')


def test_folds_are_deterministic_balanced_and_stratified():
    classes = {f"a{i}": (0, 1) for i in range(6)} | {f"b{i}": (0, 1, 2) for i in range(4)} | {"c0": (0,)}
    split = folds.assign_folds(classes, 2, seed=3)
    assert split == folds.assign_folds(dict(reversed(classes.items())), 2, seed=3)  # the order given does not matter
    assert split != folds.assign_folds(classes, 2, seed=4)
    assert sorted(Counter(split.values()).values()) == [5, 6]
    for group in ("a", "b"):  # each kind of case shared equally between the folds
        assert Counter(f for name, f in split.items() if name.startswith(group)) == {0: len(classes) // 4 + (group == "a"),
                                                                                     1: len(classes) // 4 + (group == "a")}
    with pytest.raises(ValueError, match="cannot be split into 12 folds"):
        folds.assign_folds(classes, 12, seed=0)


def test_a_written_split_is_reused_and_refused_when_the_data_changed(tmp_path):
    write_synthetic_dataset(tmp_path / "data", "atrium", cases=4, shape=(8, 8, 6), seed=0)
    split = folds.write_split(tmp_path / "folds.json", tmp_path / "data", 2, 0)
    assert folds.write_split(tmp_path / "folds.json", tmp_path / "data", 2, 0) == split
    assert sorted(Counter(split["cases"].values()).values()) == [2, 2]
    with pytest.raises(DataError, match="the split has 2 folds"):
        folds.read_split(tmp_path / "folds.json", tmp_path / "data", 3, 0)
    write_synthetic_dataset(tmp_path / "other", "atrium", cases=4, shape=(8, 8, 9), seed=0)
    label = next((tmp_path / "data" / "labelsTr").glob("*.nii.gz"))
    label.write_bytes((tmp_path / "other" / "labelsTr" / label.name).read_bytes())
    with pytest.raises(DataError, match="changed since the split was written"):
        folds.read_split(tmp_path / "folds.json", tmp_path / "data", 2, 0)


def test_export_names_the_operator_onnx_cannot_express(tmp_path):
    import torch

    from autocnnp.export import export_onnx

    class Odd(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.svd(x)[0]

    with pytest.raises(DataError, match="uses the operator aten::linalg_svd, which ONNX .opset 17. cannot express"):
        export_onnx(Odd(), torch.zeros(1, 1, 8, 8), tmp_path / "m.onnx", 17, tmp_path / "ckpt.pt")


def test_a_finished_study_reads_each_folds_manifest_once(tmp_path, monkeypatch):
    from autocnnp.run import manifest
    from autocnnp.run.job import load_job
    from autocnnp.run.study import fold_job, run_study, study_job

    write_synthetic_dataset(tmp_path / "data", "brain", cases=4, shape=(24, 24, 8), seed=1)
    job, k = study_job(load_job(write_job(tmp_path / "job.xml", degree=1, output="out", arch=TINY_UNET, data=DATA,
                                          extra=QUIET, hyper={"end_epoch": 1})), None)
    for fold in range(k):  # as a finished fold's run leaves its folder
        one = fold_job(job, fold)
        one.rundir.root.mkdir(parents=True)
        manifest.write_json(one.rundir.manifest, {"status": "completed", "job": manifest.job_record(one.spec),
                                                  "final_metrics": {"epoch": 1}})
        one.rundir.metrics.write_text(f"epoch,dice\n1,0.{fold + 5}\n")
    read = manifest.read
    seen = Counter()
    monkeypatch.setattr(manifest, "read", lambda rundir: seen.update([rundir.root.name]) or read(rundir))
    assert run_study(job) == 0
    assert seen == {"fold-0": 1, "fold-1": 1}


def test_an_ensemble_of_a_study_takes_its_folds_by_number(tmp_path):
    from autocnnp.inference import _members

    (tmp_path / "folds.json").write_text(json.dumps({"folds": 2}))
    for name in ("fold-1", "fold-0", "fold-1.old"):  # a copy set aside is no fold
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        (tmp_path / name / "checkpoints" / "ckpt-best.pt").write_bytes(b"")
    assert _members((str(tmp_path),), None) == [tmp_path / f"fold-{f}" / "checkpoints" / "ckpt-best.pt" for f in (0, 1)]


def autocnnp(*args, cwd: Path):
    return subprocess.run([sys.executable, "-m", "autocnnp", *map(str, args)], capture_output=True, text=True,
                          timeout=400, cwd=cwd)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """A 2-fold study whose fold 1 failed (its folder was a file), then run again."""
    root = tmp_path_factory.mktemp("study")
    write_synthetic_dataset(root / "data", "brain", cases=4, shape=(24, 24, 8), seed=1, test_cases=1)
    write_job(root / "job.xml", degree=1, output="out", arch=TINY_UNET, data=DATA, extra=QUIET,
              hyper={"end_epoch": 1, "minibatch_size": 4})
    (root / "out").mkdir()
    (root / "out" / "fold-1").write_text("in the way")
    first = autocnnp("study", "job.xml", "--at-once", "1", cwd=root)
    (root / "out" / "fold-1").unlink()
    again = autocnnp("study", "job.xml", cwd=root)
    return root, first, again


@pytest.mark.ranks
def test_a_failed_fold_is_rerun_alone_and_the_folds_summarised(study):
    root, first, again = study
    assert first.returncode != 0 and "fold(s) 1 failed" in first.stderr
    assert (root / "out" / "fold-0" / "checkpoints").is_dir()
    assert again.returncode == 0, again.stderr[-3000:]
    assert "fold 0 finished already" in again.stdout and "training fold(s) 1," in again.stdout
    rows = list(csv.DictReader(open(root / "out" / "folds.csv")))
    assert [r["fold"] for r in rows] == ["0", "1", "mean", "std"]
    dice = [float(r["dice/enhancing_tumour"]) for r in rows[:2]]
    assert float(rows[2]["dice/enhancing_tumour"]) == pytest.approx(np.mean(dice))
    assert float(rows[3]["dice/enhancing_tumour"]) == pytest.approx(np.std(dice, ddof=1))
    split = json.loads((root / "out" / "folds.json").read_text())
    for fold in (0, 1):
        m = json.loads((root / "out" / f"fold-{fold}" / "manifest.json").read_text())
        assert m["status"] == "completed" and m["job"]["overrides"]["data.fold"] == str(fold)
        valid = m["dataset"]["split"]
        assert valid  # the fold's own record of its split
    assert sorted(Counter(split["cases"].values()).values()) == [2, 2]
    top = json.loads((root / "out" / "manifest.json").read_text())
    assert top["kind"] == "study" and top["folds"]["k"] == 2


@pytest.mark.ranks
def test_export_agrees_with_torch_and_refuses_an_int8_model_that_loses_dice(study, cli):
    root = study[0]
    rc, out, err = cli("export", "--checkpoint", root / "out" / "fold-0", "--to", root / "export")
    assert rc == 0, err
    card = json.loads((root / "export" / "model.json").read_text())
    assert card["export"]["onnx"]["label_agreement"] >= 0.999 and card["architecture"]["name"] == "unet"
    assert (root / "export" / "model.torchscript.pt").is_file()
    rc, out, err = cli("export", "--checkpoint", root / "out" / "fold-0", "--to", root / "export", "--int8",
                       "--max-dice-drop", "-1")  # any result loses more than -1
    assert rc == 2 and "the int8 model loses" in err and "enhancing tumour" in err
    assert not (root / "export" / "model.int8.onnx").exists()
    rc, out, err = cli("export", "--checkpoint", root / "out" / "fold-0", "--int8", "--max-dice-drop", "1")
    assert rc == 0, err
    exported = root / "out" / "fold-0" / "export"  # the run's own export folder
    int8 = json.loads((exported / "model.json").read_text())["export"]["int8"]
    assert len(int8["dice"]) == 4 and (exported / "model.int8.onnx").is_file()
    for name, model in (("torch", root / "out" / "fold-0"), ("onnx", root / "export" / "model.onnx"),
                        ("int8", exported / "model.int8.onnx")):
        rc, out, err = cli("predict", "--checkpoint", model, "--input", root / "data", "--out", root / "pred" / name)
        assert rc == 0, err
    torch_labels, onnx_labels = (np.asarray(nib.load(root / "pred" / name / "case_004.nii.gz").dataobj)
                                 for name in ("torch", "onnx"))
    assert (torch_labels == onnx_labels).mean() >= 0.999  # the test volume, on its own grid
    rc, out, err = cli("zoo", "publish", root / "out" / "fold-0", "--name", "fold0", "--zoo", root / "zoo")
    assert rc == 0, err
    rc, out, err = cli("zoo", "pull", "fold0", root / "pulled", "--zoo", root / "zoo")
    assert rc == 0 and {"model.onnx", "model.int8.onnx", "model.json"} <= {p.name for p in (root / "pulled").iterdir()}


def test_an_ensemble_averages_its_members_probabilities():
    import torch

    from autocnnp.training.ensemble import Ensemble
    from autocnnp.training.sliding_window import probabilities_of as probabilities

    torch.manual_seed(0)
    members = [torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.Conv2d(2, 3, 1), torch.nn.Conv2d(2, 1, 1)]
    x = torch.randn(2, 2, 8, 8)
    for chosen in (members[:2], members[1:]):  # three classes; and a one-logit (sigmoid) member with a 2-class one
        if chosen[1].out_channels == 1:
            chosen = [torch.nn.Conv2d(2, 2, 1), chosen[1]]
        with torch.no_grad():
            expected = (probabilities(chosen[0](x)) + probabilities(chosen[1](x))) / 2
            got = torch.softmax(Ensemble(chosen)(x), dim=1)  # what predict takes of a network's logits
            each = probabilities(Ensemble(chosen, each=True)(x), groups=3)  # and each member's, side by side
            alone = torch.cat([expected, *(probabilities(member(x)) for member in chosen)], 1)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(each, alone, rtol=0, atol=1e-6)


def test_one_pass_gives_the_ensemble_and_each_member_of_a_3d_volume():
    import torch

    from autocnnp.training.ensemble import Ensemble
    from autocnnp.training.predictor import Predictor, SharedPass

    torch.manual_seed(0)
    members = [torch.nn.Conv3d(1, 3, 3, padding=1), torch.nn.Conv3d(1, 3, 1)]
    volume = np.random.default_rng(0).normal(size=(1, 6, 8, 8)).astype(np.float32)

    def predictor(net, groups=1):
        return Predictor(net.eval(), torch.device("cpu"), 2, False, None, False, groups)

    shared = SharedPass(predictor(Ensemble(members, each=True), 3))
    views = [shared.view(group).volume(volume, (4, 4, 4), 0.5)[0] for group in range(3)]
    for got, net in zip(views, [Ensemble(members), *members]):
        torch.testing.assert_close(got, predictor(net).volume(volume, (4, 4, 4), 0.5)[0], rtol=0, atol=1e-5)


@pytest.mark.ranks
def test_an_ensemble_of_the_folds_predicts_and_evaluate_compares_it_with_each_member(study, cli, monkeypatch):
    import torch

    from autocnnp import inference

    seen: Counter = Counter()  # slices each member's network ran over

    class Counted(torch.nn.Module):
        def __init__(self, net, checkpoint):
            super().__init__()
            self.net, self.checkpoint = net, checkpoint

        def forward(self, x):
            seen[self.checkpoint] += len(x)
            return self.net(x)

    network = inference._network
    monkeypatch.setattr(inference, "_network", lambda *args: Counted(network(*args), args[4]))
    root = study[0]
    rc, out, err = cli("predict", "--ensemble", root / "out", "--members", "--input", root / "data",
                       "--out", root / "ensemble")
    assert rc == 0, err
    assert "an ensemble of 2" in out and (root / "ensemble" / "member-1" / "case_004.nii.gz").is_file()
    slices = int(re.search(r"case_004: (\d+) slices", out)[1])
    assert len(seen) == 2 and set(seen.values()) == {slices}  # each member once over the volume's slices
    rc, out, err = cli("evaluate", root / "ensemble", root / "data")
    assert rc == 0, err
    table = out.splitlines()[-3:]
    assert [line.split()[0] for line in table] == ["ensemble", "member-0", "member-1"]
