"""The Python API (autocnnp.api): typed arguments and results, the same checks and files as the commands."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
from jobfiles import QUIET, run_in_group, write_job

import autocnnp
from autocnnp import api

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "xml_configs" / "demo.xml"


def test_import_is_cheap_and_validate_plan_import_no_torch():
    code = ("import sys, autocnnp\n"
            "assert 'autocnnp.api' not in sys.modules and 'autocnnp.run' not in sys.modules, 'import autocnnp loads more'\n"
            f"valid = autocnnp.validate({str(DEMO)!r}, {{'seed': 3}})\n"
            "autocnnp.plan(valid.job)\n"
            "assert 'torch' not in sys.modules, 'validate or plan imported torch'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_the_package_offers_every_api_name():
    assert set(autocnnp.API) == set(api.__all__)
    assert all(getattr(autocnnp, name) is getattr(api, name) for name in autocnnp.API)
    with pytest.raises(AttributeError):
        autocnnp.no_such_name  # noqa: B018


def test_load_validate_and_plan_with_overrides():
    job = api.load(DEMO, {"parallelism-degree": 3, "hyperparameters.lr": 1e-4, "seed": 7})
    assert (job.world_size, job.generator.hyperparameters.lr, job.generator.seed) == (3, 1e-4, 7)
    again = api.load(job, ["seed=8"])  # a loaded job with further overrides keeps the first ones
    assert (again.generator.world_size, again.generator.seed) == (3, 8)
    valid = api.validate(DEMO, ["parallelism-degree=3"])
    assert (valid.task, valid.world_size, valid.strategy, valid.architecture, valid.data, valid.ok) == \
        ("imaging_segmentation", 3, "ring_allreduce", "unet", None, True)
    plan = api.plan(job)
    assert plan.command[:3] == ["mpirun", "-np", "3"] and "--set=seed=7" in plan.command
    assert str(plan) == plan.text and "ring_allreduce" in plan.text


def test_bad_input_raises_the_commands_error():
    with pytest.raises(api.JobError) as refused:
        api.validate(DEMO, {"hyperparameters.optimiser": "sgdd"})
    assert refused.value.exit_code == api.ExitCode.BAD_INPUT
    assert str(refused.value) == ("--set hyperparameters.optimiser=sgdd: 'sgdd' is not a valid optimizer. "
                                  "Hint: did you mean 'sgd'?")


@pytest.fixture
def fake_training(monkeypatch):
    """run & manage's launch replaced by a run that writes a metrics row (dice 0.5 + seed / 10) and a manifest
    with the outcome of the exit code it is given."""
    from autocnnp.run import launch

    def fake(code: int):
        def run(job):
            folder = job.rundir
            folder.root.mkdir(parents=True, exist_ok=True)
            folder.metrics.write_text(f"epoch,dice\n1,{0.5 + job.generator.seed / 10}\n")
            folder.manifest.write_text(json.dumps({"status": {0: "completed", 3: "diverged"}[code]}))
            return code
        monkeypatch.setattr(launch, "run", run)
    return fake


def test_train_returns_the_exit_code_outcome_folder_and_final_metrics(fake_training, tmp_path):
    fake_training(3)
    result = api.train(DEMO, {"output": tmp_path / "run"})
    assert result == api.RunResult(3, "diverged", tmp_path / "run", {"epoch": 1, "dice": 0.5}) and not result.ok
    fake_training(0)
    result = api.train(DEMO, {"output": tmp_path / "set", "seed": 1}, repeat=2)  # seeds 1 and 2
    assert (result.exit_code, result.outcome, result.run_dir) == (0, "completed", tmp_path / "set")
    assert result.metrics == {"dice": pytest.approx(0.65)} and result.summary["dice"]["n"] == 2


def test_predict_and_evaluate_return_what_they_wrote(tmp_path):
    import torch

    from autocnnp.data.synth import write_synthetic_dataset
    from autocnnp.generator.assemble import assemble
    from autocnnp.training.loop import model_card

    write_synthetic_dataset(tmp_path / "data", "atrium", cases=1, shape=(20, 24, 6), seed=3, test_cases=2)
    arch = '<CNN_archi name="unet"><param name="depth">2</param><param name="base_channels">4</param></CNN_archi>'
    data = ('<data format="decathlon"><train><path>data</path></train><test><path>data</path></test>'
            '<param name="size">16</param></data>')
    gen = assemble(write_job(tmp_path / "job.xml", arch=arch, data=data, extra=QUIET))
    torch.manual_seed(0)
    net = gen.action("architecture_injection").build(in_channels=1, num_classes=2)
    card = model_card(gen, types.SimpleNamespace(in_channels=1, num_classes=2, class_names=("background", "left atrium")))
    torch.save({"model": net.state_dict(), "model_card": card}, tmp_path / "model.pt")

    predicted = api.predict(api.PredictOptions(checkpoint=str(tmp_path / "model.pt"), input=tmp_path / "data",
                                               out=tmp_path / "pred", threads=1))
    assert predicted.out == tmp_path / "pred" and predicted.classes == ("background", "left atrium")
    assert predicted.labels == {c: tmp_path / "pred" / f"{c}.nii.gz" for c in ("case_001", "case_002")}
    assert all(f.is_file() for f in predicted.labels.values()) and predicted.ms_per_slice > 0

    scores = api.evaluate(api.EvaluateOptions(predicted.out, tmp_path / "data", out=tmp_path / "report.json"))
    report = json.loads((tmp_path / "report.json").read_text())
    assert scores.report == tmp_path / "report.json" and scores.classes == {0: "background", 1: "left atrium"}
    assert [r["case"] for r in scores.cases] == ["case_001", "case_002"] == [r["case"] for r in report["cases"]]
    assert scores.overall["dice_fg"] == pytest.approx(report["overall"]["dice_fg"])
    assert scores.pooled["dice_fg"] == pytest.approx(report["pooled"]["dice_fg"])


def test_scale_returns_the_report():
    report = api.scale(api.ScaleOptions(preset="r2d2-unet", ranks="1,18"))
    assert isinstance(report, api.ScaleReport) and [row.world_size for row in report.rows] == [1, 18]
    assert report.rows[0].speedup == pytest.approx(1.0)


def test_the_zoo_publishes_lists_shows_and_fetches_models(tmp_path):
    pytest.importorskip("mlflow", reason="mlflow is pinned in requirements/test.txt (make venv)")
    import torch

    from autocnnp.components.architectures.unet import UNet

    run, zoo = tmp_path / "run", str(tmp_path / "zoo")
    (run / "checkpoints").mkdir(parents=True)
    card = {"architecture": {"name": "unet"}, "classes": {"0": "background", "1": "organ"}, "in_channels": 1,
            "job": {"text": "<system_config/>"}}
    model = UNet(1, 2, depth=2, base_channels=4, norm="none").state_dict()
    torch.save({"model": model, "epoch": 2, "model_card": card}, run / "checkpoints" / "ckpt-epoch0002.pt")
    (run / "checkpoints" / "latest").write_text("ckpt-epoch0002.pt\n")
    (run / "metrics.csv").write_text("epoch,dice_fg\n1,0.5\n2,0.75\n")
    assert api.zoo_list(zoo) == []
    published = api.zoo_publish(run, "organ", zoo=zoo)
    assert (published.name, published.version, published.versions) == ("organ", 1, 1)
    assert published.metrics == {"dice_fg": 0.75} and published.classes == ["background", "organ"]
    assert api.zoo_publish(run, "organ", description="again", zoo=zoo).version == 2
    assert [(m.name, m.version, m.versions, m.description) for m in api.zoo_list(zoo)] == [("organ", 2, 2, "again")]
    assert dataclasses.replace(api.zoo_show("organ/1", zoo), versions=1) == published
    fetched = api.zoo_fetch("zoo:organ/1", tmp_path / "pulled", zoo)
    assert fetched.parent == tmp_path / "pulled" and torch.load(fetched, weights_only=False)["epoch"] == 2


@pytest.mark.ranks
def test_the_example_trains_the_demo_and_prints_its_results(tmp_path):
    """examples/api_example.py: the demo job, tiny, loaded, validated, planned, trained on 2 ranks."""
    rc, out, err = run_in_group([sys.executable, str(ROOT / "examples" / "api_example.py"), str(tmp_path / "run")],
                                300)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == "valid: imaging_segmentation, 2 ranks, ring_allreduce, unet"
    assert lines[1].startswith("command: mpirun -np 2 ") and "--set=hyperparameters.end_epoch=1" in lines[1]
    assert "exit code: 0 (completed)" in lines and f"run folder: {tmp_path / 'run'}" in lines
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    header, last = rows[0].split(","), dict(zip(rows[0].split(","), rows[-1].split(","), strict=True))
    assert len(rows) == 2 and "dice_fg" in header  # one epoch
    assert f"dice_fg: {float(last['dice_fg']):.4g}" in lines and "epoch: 1" in lines
