"""The tensorflow framework: chosen by the job file's framework action, refused component by component
before anything starts, trained with real ranks (MultiWorkerMirroredStrategy, TF_CONFIG agreed over MPI).

TensorFlow is no dependency of `make venv`: `make tensorflow` installs the pinned tensorflow-cpu.
Tests that need it are skipped where it cannot be imported, unless AUTOCNNP_REQUIRE_TENSORFLOW is set
(CI sets it), where that is a failure. The engine's checks need no TensorFlow and always run.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from jobfiles import QUIET, require_import, synthetic_data, write_job

AUTOCNNP = [sys.executable, "-m", "autocnnp"]
FRAMEWORK = '<action class="non_extensible" type="framework"><value>tensorflow</value></action>'
PLAIN_UNET = ('<CNN_archi name="unet"><param name="depth">2</param><param name="base_channels">4</param>'
              '<param name="norm">none</param></CNN_archi>')


def generator(env: str = "", strategy: str = "ring_allreduce", lr_policy: str = "constant", extra: str = "") -> str:
    """A tensorflow job's generator section (``env``: more train_env_def actions)."""
    return (f'<module name="train_env_def">{FRAMEWORK}{env}</module>'
            f'<module name="train_strategy_def"><action class="extensible" type="dist_strategy"><value>{strategy}'
            f'</value></action><action class="extensible" type="lr_policy"><value>{lr_policy}</value></action>'
            f'{extra}</module>')


def cli(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*AUTOCNNP, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def latest(out: Path) -> dict:
    name = (out / "checkpoints" / "latest").read_text().strip()
    return torch.load(out / "checkpoints" / Path(name).name, map_location="cpu", weights_only=False)


def last_metrics(out: Path) -> dict:
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))[-1]


@pytest.fixture(scope="module")
def tensorflow() -> None:
    """Skip (or, with AUTOCNNP_REQUIRE_TENSORFLOW set, fail) unless `import tensorflow` works here."""
    require_import("tensorflow", "tensorflow", "AUTOCNNP_REQUIRE_TENSORFLOW")


# --- the engine: no TensorFlow needed ----------------------------------------------------------------------

@pytest.mark.parametrize("env,strategy,refusal,alternatives", [
    ("", "mpi", "dist_strategy 'mpi' has no tensorflow implementation (it exists for torch)", "horovod, ring_allreduce"),
    ('<action class="non_extensible" type="communication_init"><value>torch_distributed</value></action>',
     "ring_allreduce", "communication_init 'torch_distributed' has no tensorflow implementation", "horovod, tf_config"),
    ('<action class="non_extensible" type="memory_allocation"><value>fraction</value></action>',
     "ring_allreduce", "memory_allocation 'fraction' has no tensorflow implementation", "allow_growth, soft_placement"),
])
def test_an_action_without_a_tensorflow_implementation_is_refused_naming_the_alternatives(
        tmp_path, env, strategy, refusal, alternatives):
    job = write_job(tmp_path / "job.xml", actions=generator(env, strategy), arch=PLAIN_UNET)
    result = cli("validate", job)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert refusal in result.stderr and f"choose one of: {alternatives}" in result.stderr
    assert f"{job}:" in result.stderr  # file and line


def test_the_torch_tree_refuses_a_tensorflow_only_component(tmp_path):
    env = '<action class="non_extensible" type="communication_init"><value>tf_config</value></action>'
    job = write_job(tmp_path / "job.xml", actions=f'<module name="train_env_def">{env}</module>')
    result = cli("validate", job)
    assert result.returncode == 2
    assert "communication_init 'tf_config' has no torch implementation (it exists for tensorflow)" in result.stderr


def test_a_user_file_declaring_another_framework_and_fp16_are_refused(tmp_path):
    (tmp_path / "net.py").write_text("class Net:\n    frameworks = ('torch',)\n    def forward(self, x):\n        return x\n")
    job = write_job(tmp_path / "job.xml", actions=generator(), arch='<CNN_archi><path>net.py</path></CNN_archi>')
    result = cli("validate", job)
    assert result.returncode == 2 and "is written for torch, but the job trains with tensorflow" in result.stderr
    job = write_job(tmp_path / "job.xml", actions=generator(), arch=PLAIN_UNET, hyper={"precision": "fp16"})
    result = cli("validate", job)
    assert result.returncode == 2 and "precision fp16 (with a loss scaler) is trained on the torch framework only" \
        in result.stderr and "Hint: write bf16" in result.stderr


def test_run_without_tensorflow_installed_says_make_tensorflow_before_any_rank_starts(tmp_path, monkeypatch):
    import importlib.util

    from autocnnp.core.errors import JobError
    from autocnnp.run import preflight
    from autocnnp.run.job import load_job

    job = load_job(write_job(tmp_path / "job.xml", actions=generator(), arch=PLAIN_UNET), [])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorflow" else real(name, *a))
    with pytest.raises(JobError, match=r"job.xml:\d+:\d+: the job trains with framework tensorflow, which is not "
                       r"installed in this environment. Hint: run `make tensorflow`"):
        preflight.check_framework(job)


def in_process(capsys, *args) -> tuple[int, str, str]:
    """``autocnnp ARGS`` run in this process (so a test can patch it): exit code, stdout, stderr."""
    from autocnnp.cli import main

    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def pretend_tensorflow_is_installed(monkeypatch, installed: bool) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
        (real("json") if installed else None) if name == "tensorflow" else real(name, *a)))


@pytest.mark.parametrize("pointer", [True, False], ids=["latest-pointer", "no-pointer"])
@pytest.mark.parametrize(("trained", "framework"), [("torch", "tensorflow"), ("tensorflow", "torch")])
def test_resuming_another_frameworks_checkpoint_is_refused_before_any_rank_starts(
        tmp_path, capsys, monkeypatch, nothing_starts, trained, framework, pointer):
    """The checkpoint is read without torch in the front-end: one line, exit 2, nothing started (the ranks
    found out after 32 s); without its ``latest`` pointer too (the ranks resume from the highest epoch then)."""
    from autocnnp.components.checkpoints.periodic import Config, Periodic

    pretend_tensorflow_is_installed(monkeypatch, True)
    job = write_job(tmp_path / "job.xml", degree=1, actions=generator() if framework == "tensorflow" else None,
                    arch=PLAIN_UNET, data=synthetic_data(8, 4), extra=QUIET)
    Periodic(Config(), directory=tmp_path / "out" / "checkpoints", rank=0).save(
        {"model": {"w": torch.zeros(2)}, "optimizer_type": "SGD", "epoch": 1, "model_card": {"framework": trained}}, 0)
    if not pointer:
        (tmp_path / "out" / "checkpoints" / "latest").unlink()
    rc, out, err = in_process(capsys, "run", job)
    assert (rc, err.count("\n")) == (2, 1), err
    assert (f"the run folder {tmp_path / 'out'} holds a checkpoint of a {trained} run (ckpt-epoch0001.pt) to resume "
            f"from, but the job trains with {framework}. Hint: resume with framework {trained}, or start afresh") in err


def test_predict_on_a_tensorflow_checkpoint_without_tensorflow_is_one_line(tmp_path, capsys, monkeypatch):
    from autocnnp.data.synth import write_synthetic_dataset
    from autocnnp.generator.assemble import assemble
    from autocnnp.generator.protocols import DataBundle
    from autocnnp.training.loop import model_card

    write_synthetic_dataset(tmp_path / "data", "atrium", cases=2, shape=(16, 16, 6), seed=1, test_cases=1)
    job = write_job(tmp_path / "job.xml", actions=generator(), arch=PLAIN_UNET,
                    data='<data format="decathlon"><train><path>data</path></train><param name="size">16</param></data>')
    card = model_card(assemble(job), DataBundle(None, None, 1, 2, class_names=("background", "left_atrium")))
    torch.save({"model": {"w": np.zeros(2)}, "model_card": card}, tmp_path / "ckpt.pt")
    pretend_tensorflow_is_installed(monkeypatch, False)
    rc, out, err = in_process(capsys, "predict", "--checkpoint", tmp_path / "ckpt.pt", "--input", tmp_path / "data",
                              "--out", tmp_path / "pred")
    assert (rc, err.count("\n")) == (2, 1) and "Traceback" not in err, err
    assert (f"{tmp_path / 'ckpt.pt'}: the model was trained with framework tensorflow, which is not installed in "
            "this environment. Hint: run `make tensorflow`") in err


def test_validate_and_plan_import_neither_tensorflow_nor_torch(tmp_path):
    job = write_job(tmp_path / "job.xml", actions=generator(), arch=PLAIN_UNET)
    code = textwrap.dedent(f"""
        import sys
        from autocnnp.cli import main
        assert main(["validate", {str(job)!r}]) == 0 and main(["plan", {str(job)!r}]) == 0
        heavy = sorted(m for m in ("tensorflow", "keras", "torch") if m in sys.modules)
        assert not heavy, heavy
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "framework [non-extensible] = tensorflow" in result.stdout
    assert "communication_init [non-extensible] = tf_config  (built-in, chosen by the engine)" in result.stdout


@pytest.mark.slow
def test_a_torch_job_never_imports_tensorflow(tensorflow, tmp_path):
    """TensorBoard imports TensorFlow where it is installed: the files tracker of a torch job keeps it out."""
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from autocnnp.components.trackers.files import Config, Files
        from autocnnp.generator.protocols import RunInfo
        files = Files(Config(plots=False), info=RunInfo("job", Path({str(tmp_path)!r}), {{}}, {{}}, {{}}))
        files.epoch_end(0, {{"dice": 0.5}}, 1)
        files.close("completed")
        assert "tensorflow" not in sys.modules
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert list((tmp_path / "tensorboard").iterdir())


# --- the tensorflow components ------------------------------------------------------------------------------

BUILD_EVERY_TENSORFLOW_BUILTIN = textwrap.dedent("""
    import dataclasses, os, sys, typing
    from pathlib import Path
    import autocnnp.training.keras_trainer as keras_trainer  # Keras on TensorFlow, as a tensorflow job imports it
    assert keras_trainer.keras.backend.backend() == "tensorflow"
    assert os.environ["KERAS_BACKEND"] == "torch"  # the test's, as it was: the subprocesses a job starts inherit it
    import numpy as np
    from autocnnp.core.world import World
    from autocnnp.engine.values import bind
    from autocnnp.generator.points import POINTS, registry
    from autocnnp.generator.protocols import summary

    def fields(cls):
        hints = typing.get_type_hints(cls)
        return [(f.name, f.default, hints[f.name], dict(f.metadata)) for f in dataclasses.fields(cls)]

    built = []
    for point in POINTS:
        for name in point.registry.names("tensorflow"):
            entry = point.registry.get(name, None, "tensorflow")
            impl = entry.load()
            real = getattr(sys.modules[impl.__module__], "Config", None)
            assert (entry.config is None) == (real is None), name
            assert real is None or fields(entry.config) == fields(real), name
            assert entry.summary == summary(impl), name
            if "torch" in entry.frameworks or name in ("keras", "horovod"):  # horovod: the runs below
                continue
            config = bind(entry.config, [], Path("."), name)
            args = [config] if config is not None else []
            if point.type == "architecture_injection":
                model = impl(*args, in_channels=2, num_classes=3)
                out = model(np.zeros((1, 32, 32, 2), np.float32))
                assert tuple(out.shape) == (1, 32, 32, 3), (name, out.shape)
                rule = config.input_sizes()  # the engine's size rule is the Keras network's too
                side = rule.nearest(rule.multiple + 1)[-1]
                assert tuple(model(np.zeros((1, side, 32, 2), np.float32)).shape) == (1, side, 32, 3), name
                try:
                    model(np.zeros((1, side + rule.multiple // 2, 32, 2), np.float32))
                except Exception:  # noqa: BLE001 - Keras' shape errors differ by layer
                    pass
                else:
                    raise AssertionError(f"{name} took a side its rule {rule} refuses")
            elif point.type == "communication_init":
                assert impl(*args, timeout_s=60).world_size == 1
            elif point.type == "device_placement":
                assert impl(*args, world=World()) == "/CPU:0"
            elif point.type == "memory_allocation":
                assert impl(*args, device="/CPU:0") == "/CPU:0"
            elif point.type == "dist_strategy":
                assert impl(config, world=World(), device="/CPU:0").share == 1.0
            built.append(f"{point.type}:{name}")
    assert os.environ["KERAS_BACKEND"] == "torch"
    print(" ".join(built))
""")


@pytest.mark.slow
def test_every_tensorflow_builtin_reads_as_its_module_and_builds_from_its_defaults(tensorflow, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI_", "RANK", "WORLD_SIZE", "TF_CONFIG"))}
    env["KERAS_BACKEND"] = "torch"  # another backend set: Keras still loads on TensorFlow, the setting stays
    result = subprocess.run([sys.executable, "-c", BUILD_EVERY_TENSORFLOW_BUILTIN], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert set(result.stdout.split()) >= {
        "framework:tensorflow", "communication_init:tf_config", "device_placement:local_rank", "device_placement:cpu",
        "memory_allocation:soft_placement", "memory_allocation:allow_growth", "dist_strategy:ring_allreduce",
        "architecture_injection:unet", "architecture_injection:fcn"}


# --- real ranks ----------------------------------------------------------------------------------------------

TRACE_ONCE = textwrap.dedent("""
    import numpy as np
    from autocnnp.components.architectures.keras_unet import Config, build
    from autocnnp.generator.protocols import KerasStrategy
    from autocnnp.training import keras_losses
    from autocnnp.training.keras_trainer import KerasInference, make_optimizer, train_step

    class HP:
        optimizer, lr = "adam", 1e-3

    model = build(Config(depth=2, base_channels=4), in_channels=2, num_classes=3)
    optimizer = make_optimizer(HP)
    optimizer.build(model.trainable_variables)
    step = train_step(model, optimizer, KerasStrategy(None, world=None, device="/CPU:0"),
                      keras_losses.get_loss("dice_ce"), 0.0, 3)
    inference = KerasInference(model)
    for epoch in range(2):
        for lr in (1e-3, 2e-3):  # another learning rate: the same trace
            step(np.zeros((4, 32, 32, 2), np.float32), np.zeros((4, 32, 32), np.int64), np.float32(lr))
        for batch, side in [(4, 32), (3, 32), (2, 24)]:  # a short last batch, another image size
            inference.forward_fn(np.zeros((batch, side, side, 2), np.float32))
    print(step.experimental_get_tracing_count(), inference.forward_fn.experimental_get_tracing_count())
""")


def test_the_step_is_traced_once_and_validation_once_for_every_batch_and_image_size(tensorflow, tmp_path):
    """Each trace costs the first epoch seconds: later epochs and learning rates reuse the step's, and validation
    batches of every size one trace."""
    result = subprocess.run([sys.executable, "-c", TRACE_ONCE], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "KERAS_BACKEND": "tensorflow"}, timeout=300)  # another test's may linger
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["1", "1"]


@pytest.mark.parametrize("strategy", ["ring_allreduce", "horovod"])
@pytest.mark.ranks
def test_two_ranks_with_batch_b_give_the_weights_of_one_rank_with_batch_2b(tensorflow, tmp_path, strategy):
    """MultiWorkerMirroredStrategy (or Horovod) over 2 MPI ranks: 8 steps of 2 x 2 samples end where 8 steps
    of 4 do (constant LR, SGD with momentum and L2 weight decay, per-sample Dice + cross-entropy, no BatchNorm)."""
    if strategy == "horovod":
        require_import("horovod.tensorflow", "horovod", "AUTOCNNP_REQUIRE_HOROVOD")
    hyper = dict(minibatch_size=2, end_epoch=2, lr=0.05, optimiser="sgd", weight_decay=0.01, loss="dice_ce")
    data = synthetic_data(16, 6)
    two = write_job(tmp_path / "two.xml", degree=2, output="two", arch=PLAIN_UNET, data=data, hyper=hyper,
                    actions=generator(strategy=strategy), extra=QUIET)
    one = write_job(tmp_path / "one.xml", degree=1, output="one", arch=PLAIN_UNET, data=data,
                    hyper={**hyper, "minibatch_size": 4}, actions=generator(strategy=strategy), extra=QUIET)
    for job in (two, one):
        result = cli("run", job)
        assert result.returncode == 0, result.stderr[-3000:]
    a, b = latest(tmp_path / "two"), latest(tmp_path / "one")
    assert a["model_card"]["framework"] == "tensorflow" and a["world_size"] == 2 and b["world_size"] == 1
    assert a["model"].keys() == b["model"].keys() and len(a["model"]) == 16  # 8 convolutions: kernels, biases
    for name, value in a["model"].items():
        np.testing.assert_allclose(value, b["model"][name], rtol=1e-4, atol=2e-6, err_msg=name)
    assert a["optimizer"][0] == b["optimizer"][0] == 8  # optimizer steps: 2 epochs x 4
    for x, y in zip(a["optimizer"][2:], b["optimizer"][2:], strict=True):  # the momenta
        assert np.abs(x).max() > 0
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-6)
    assert float(last_metrics(tmp_path / "two")["dice"]) == pytest.approx(float(last_metrics(tmp_path / "one")["dice"]),
                                                                       abs=1e-3)


KERAS_NET = '''
import keras


def build(in_channels, num_classes):
    """A small Keras network of the user's, with a TensorFlow op in it."""
    import tensorflow as tf

    inputs = keras.Input((None, None, in_channels))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Lambda(lambda t: tf.nn.relu6(t))(x)
    return keras.Model(inputs, keras.layers.Conv2D(num_classes, 1)(x))
'''


@pytest.mark.ranks
def test_a_user_keras_file_resumes_exactly_and_its_checkpoint_predicts_volumes(tensorflow, tmp_path):
    from autocnnp.data.synth import write_synthetic_dataset

    write_synthetic_dataset(tmp_path / "data", "atrium", cases=4, shape=(24, 20, 6), seed=3, test_cases=1)
    (tmp_path / "net.py").write_text(KERAS_NET)
    data = ('<data format="decathlon"><train><path>data</path></train><test><path>data</path></test>'
            '<param name="slices_per_volume">4</param><param name="size">16</param></data>')
    hyper = dict(minibatch_size=2, end_epoch=3, lr=0.01, optimiser="adam", loss="dice_ce")
    arch = '<CNN_archi><path>net.py</path></CNN_archi>'
    straight = write_job(tmp_path / "straight.xml", degree=2, output="straight", arch=arch, data=data, hyper=hyper,
                         actions=generator(lr_policy="grescale"), extra=QUIET)
    resumed = write_job(tmp_path / "resumed.xml", degree=2, output="resumed", arch=arch, data=data, hyper=hyper,
                        actions=generator(lr_policy="grescale"), extra=QUIET)
    for args in ((straight,), (resumed, "--set", "hyperparameters.end_epoch=2"), (resumed,)):
        result = cli("run", *args)
        assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout + result.stderr
    a, b = latest(tmp_path / "straight"), latest(tmp_path / "resumed")
    from autocnnp.core.card import trained_framework  # the front-end's torch-free reading of a real checkpoint

    assert trained_framework(tmp_path / "straight" / "checkpoints" / "ckpt-epoch0003.pt") == "tensorflow"
    assert a["epoch"] == b["epoch"] == 3 and a["lr_policy"] == b["lr_policy"]
    for name, value in a["model"].items():
        np.testing.assert_array_equal(value, b["model"][name], err_msg=name)
    for x, y in zip(a["optimizer"], b["optimizer"], strict=True):
        np.testing.assert_array_equal(x, y)
    result = cli("predict", straight, "--out", tmp_path / "pred")
    assert result.returncode == 0, result.stderr[-3000:]
    import nibabel as nib

    (case,) = sorted((tmp_path / "data" / "imagesTs").glob("*.nii.gz"))
    predicted = nib.load(tmp_path / "pred" / case.name)
    assert predicted.shape == (24, 20, 6) and set(np.unique(np.asarray(predicted.dataobj))) <= {0, 1}


@pytest.mark.ranks
def test_the_demo_job_reaches_the_dice_of_torch_on_tensorflow(tensorflow, tmp_path):
    """xml_configs/demo.xml (U-Net, 2 ranks, 10 epochs) trained by both frameworks: foreground Dice
    0.983 on tensorflow and 0.97-0.98 on torch when this test was written."""
    text = (Path(__file__).resolve().parents[1] / "xml_configs" / "demo.xml").read_text()
    dice = {}
    for framework in ("torch", "tensorflow"):
        job = tmp_path / f"{framework}.xml"
        job.write_text(text.replace("<path>runs/demo</path>", f"<path>{framework}</path>"))
        result = cli("run", job, "--set", f"framework={framework}", "--set", "monitoring.plots=false")
        assert result.returncode == 0, result.stderr[-3000:]
        dice[framework] = float(last_metrics(tmp_path / framework)["dice_fg"])
    print(f"demo job foreground Dice: {dice}")
    assert min(dice.values()) > 0.9 and abs(dice["tensorflow"] - dice["torch"]) < 0.05, dice


FOUR_CHANNEL_SOURCE = """
import sys
import keras
import numpy as np
import torch
from autocnnp.components.architectures.keras_unet import build
from autocnnp.components.architectures.unet import Config
from autocnnp.training.keras_trainer import weights_of

keras.utils.set_random_seed(5)
model = build(Config(depth=2, base_channels=4, norm="batch"), in_channels=4, num_classes=2)
for layer in model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
        layer.moving_mean.assign(np.random.uniform(-1, 1, layer.moving_mean.shape))
        layer.moving_variance.assign(np.random.uniform(0.5, 2, layer.moving_variance.shape))
torch.save({"model": weights_of(model), "model_card": {"framework": "tensorflow"}}, sys.argv[1])
"""


@pytest.mark.ranks
def test_freeze_encoder_on_tensorflow_trains_what_is_new_and_keeps_the_statistics(tensorflow, tmp_path):
    """A 4-channel Keras U-Net with batch norm starts a 1-channel tensorflow job: the new first layer trains, the
    rest of the encoder (weights and BatchNormalization moving statistics) stays as loaded."""
    source = tmp_path / "four.pt"
    made = subprocess.run([sys.executable, "-c", FOUR_CHANNEL_SOURCE, source], capture_output=True, text=True,
                          env={**os.environ, "KERAS_BACKEND": "tensorflow"}, timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    arch = PLAIN_UNET.replace("none", "batch").replace('name="unet"', 'name="unet" pretrained="four.pt" '
                                                                         'freeze="encoder"')
    job = write_job(tmp_path / "job.xml", degree=2, output="out", arch=arch, actions=generator(), extra=QUIET,
                    data=synthetic_data(16, 4, "atrium"), hyper=dict(minibatch_size=4, end_epoch=2, lr=0.01))
    result = cli("run", job)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "new: encoder0_0_conv/kernel" in result.stdout and "4 norm layers keep their statistics" in result.stdout
    assert "newly initialised parameters in it train" in result.stdout
    saved = {k.partition(":")[2]: v for k, v in torch.load(source, weights_only=False)["model"].items()}
    first, after = ({k.partition(":")[2]: v for k, v in torch.load(tmp_path / "out" / "checkpoints" /
                                                                     f"ckpt-epoch000{n}.pt", weights_only=False)[
                         "model"].items()} for n in (1, 2))
    encoder = [k for k in saved if k.startswith("encoder") and k != "encoder0_0_conv/kernel"]
    assert any("moving_mean" in k for k in encoder)
    moved = [k for k in encoder if not np.array_equal(saved[k], after[k])]
    assert not moved, f"frozen variables changed: {moved}"
    assert after["encoder0_0_conv/kernel"].shape[2] == 1  # HWIO: one input channel
    assert not np.array_equal(first["encoder0_0_conv/kernel"], after["encoder0_0_conv/kernel"])  # it trains
