"""A Keras 3 model file as the architecture: loaded on Keras' torch backend, trained as a torch module."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from jobfiles import write_job

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("keras") is None, reason="keras is not installed"),
    # Keras' torch backend converts variables with np.array(tensor) when saving (a Keras-side NumPy 2 notice)
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
]
AUTOCNNP = [sys.executable, "-m", "autocnnp"]


@pytest.fixture(scope="module")
def keras():
    from autocnnp.training.keras_backend import import_keras

    return import_keras()


def save_model(keras, path: Path, in_channels: int = 2, classes: int = 3, final: str | None = None,
               batchnorm: bool = True) -> Path:
    """A small functional segmentation network (logits unless ``final`` names an activation)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, None, in_channels))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    if batchnorm:
        x = keras.layers.BatchNormalization()(x)
    skip = x
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(x)
    x = keras.layers.UpSampling2D(2)(x)
    x = keras.layers.Concatenate()([x, skip])
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    outputs = keras.layers.Conv2D(classes, 1, activation=final)(x)
    keras.Model(inputs, outputs).save(path)
    return path


def build(path: Path, in_channels: int = 2, classes: int = 3):
    from autocnnp.components.architectures.keras_file import Config
    from autocnnp.components.architectures.keras_file import build as build_keras

    return build_keras(Config(path=path), in_channels=in_channels, num_classes=classes)


@pytest.mark.slow
def test_adapter_takes_and_returns_nchw_like_the_keras_model(keras, tmp_path):
    net = build(save_model(keras, tmp_path / "model.keras"))
    x = torch.randn(2, 2, 16, 24)
    net.eval()
    y = net(x)
    assert y.shape == (2, 3, 16, 24)
    with torch.no_grad():
        direct = net.keras_model(x.permute(0, 2, 3, 1), training=False)
    torch.testing.assert_close(y, direct.permute(0, 3, 1, 2))
    # channels_last memory format in (the trainer's channels_last hyperparameter) gives the same logits
    net_cl = net.to(memory_format=torch.channels_last)
    torch.testing.assert_close(net_cl(x.contiguous(memory_format=torch.channels_last)), y)


def test_gradients_reach_the_keras_weights_and_an_optimizer_moves_them(keras, tmp_path):
    net = build(save_model(keras, tmp_path / "model.keras"))
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert len(trainable) == 10  # 4 conv kernels + 4 biases + BN gamma/beta
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    net.train()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    logits = net(torch.randn(4, 2, 8, 8))
    loss = torch.nn.functional.cross_entropy(logits, torch.randint(0, 3, (4, 8, 8)))
    optimizer.zero_grad()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    optimizer.step()
    after = dict(net.named_parameters())
    for name, p in after.items():
        changed = not torch.equal(before[name], p.detach())
        # trainable weights moved by SGD; BN moving statistics moved by the training-mode forward pass
        assert changed, name
    # The Keras variables are those very parameters: Keras sees what torch trained.
    kernel = net.keras_model.layers[1].kernel
    assert any(kernel.value is p for p in net.parameters())
    # eval() runs Keras in inference mode: BN statistics stay put
    stats = [p.detach().clone() for p in net.parameters() if not p.requires_grad]
    net.eval()
    with torch.no_grad():
        net(torch.randn(4, 2, 8, 8))
    assert all(torch.equal(a, b) for a, b in zip(stats, (p for p in net.parameters() if not p.requires_grad)))


def test_state_dict_round_trip_restores_the_keras_weights(keras, tmp_path):
    path = save_model(keras, tmp_path / "model.keras")
    trained, fresh = build(path), build(path)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.5)
    x = torch.randn(2, 2, 8, 8)
    trained.eval(), fresh.eval()
    assert not torch.allclose(trained(x), fresh(x))
    fresh.load_state_dict(trained.state_dict())  # what resuming from a checkpoint does
    torch.testing.assert_close(fresh(x), trained(x))


def test_channel_and_class_mismatches_and_softmax_outputs_are_clear_errors(keras, tmp_path):
    path = save_model(keras, tmp_path / "net.keras", in_channels=2, classes=3)
    with pytest.raises(ValueError, match=r"Keras model .*net\.keras takes images with 2 channel\(s\).*the data has 4"):
        build(path, in_channels=4, classes=3)
    with pytest.raises(ValueError, match=r"net\.keras outputs 3 class\(es\).*the data has 2 classes"):
        build(path, in_channels=2, classes=2)
    soft = save_model(keras, tmp_path / "soft.keras", final="softmax")
    with pytest.raises(ValueError, match=r"soft\.keras ends in a softmax activation.*logits"):
        build(soft)


def test_a_job_naming_a_keras_file_validates_without_importing_torch_or_keras(keras, tmp_path):
    save_model(keras, tmp_path / "model.keras", in_channels=1, classes=2)
    job = write_job(tmp_path / "job.xml", arch="<CNN_archi><path>model.keras</path></CNN_archi>", data=SMALL_DATA)
    proc = subprocess.run([sys.executable, "-X", "importtime", *AUTOCNNP[1:], "validate", str(job)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [line for line in proc.stderr.splitlines() if "torch" in line or "keras" in line] == []
    plan = subprocess.run([*AUTOCNNP, "plan", str(job)], capture_output=True, text=True)
    assert plan.returncode == 0, plan.stderr
    assert "keras" in plan.stdout and "model.keras" in plan.stdout


def test_a_keras_file_with_a_lambda_layer_is_refused_by_validate_pointing_at_a_py_architecture(keras, tmp_path):
    """Keras' safe mode refuses a Lambda's Python code (suggesting safe_mode=False, which no job can set): validate
    says so first, reading the file's config.json without Keras, and names the way that works."""
    inputs = keras.Input((None, None, 1))
    outputs = keras.layers.Lambda(lambda t: 2.0 * t, name="double")(keras.layers.Conv2D(2, 1)(inputs))
    keras.Model(inputs, outputs).save(tmp_path / "model.keras")
    job = write_job(tmp_path / "job.xml", arch="<CNN_archi><path>model.keras</path></CNN_archi>", data=SMALL_DATA)
    proc = subprocess.run([*AUTOCNNP, "validate", str(job)], capture_output=True, text=True)
    assert (proc.returncode, proc.stdout, proc.stderr.count("\n")) == (2, "", 1), proc.stderr
    assert "model.keras holds Python code in its layer 'double' (a Lambda)" in proc.stderr
    assert "Hint: describe the network in a .py architecture" in proc.stderr and "safe_mode" not in proc.stderr


SMALL_DATA = ('<data format="synthetic"><param name="kind">atrium</param><param name="train_samples">16</param>'
              '<param name="valid_samples">6</param><param name="size">16</param></data>')


@pytest.mark.ranks
def test_two_rank_run_trains_a_keras_model(keras, tmp_path):
    save_model(keras, tmp_path / "model.keras", in_channels=1, classes=2)
    job = write_job(tmp_path / "job.xml", output="out", arch="<CNN_archi><path>model.keras</path></CNN_archi>",
                    data=SMALL_DATA, hyper=dict(minibatch_size=2, end_epoch=2, lr=0.05, optimiser="sgd"))
    result = subprocess.run([*AUTOCNNP, "run", str(job)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "out" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert all(0 <= float(r["train_loss"]) < 10 for r in rows)
    latest = (tmp_path / "out" / "checkpoints" / "latest").read_text().strip()
    saved = torch.load(tmp_path / "out" / "checkpoints" / Path(latest).name, map_location="cpu", weights_only=False)
    assert any("conv2d" in key for key in saved["model"])  # the Keras weights were checkpointed



@pytest.mark.parametrize("given", [None, "jax"])
def test_loading_keras_leaves_the_environment_of_later_subprocesses_as_it_was(given, tmp_path, monkeypatch):
    from autocnnp.training.keras_backend import import_keras

    (tmp_path / "keras.py").write_text("import os\nclass backend:\n    backend = staticmethod(lambda: CHOSEN)\n"
                                       "CHOSEN = os.environ['KERAS_BACKEND']  # as Keras reads it when imported\n")
    monkeypatch.syspath_prepend(tmp_path)
    monkeypatch.delitem(sys.modules, "keras", raising=False)  # the real one, if loaded, is back after the test
    if given is None:
        monkeypatch.delenv("KERAS_BACKEND", raising=False)
    else:
        monkeypatch.setenv("KERAS_BACKEND", given)
    try:
        assert import_keras().backend.backend() == "torch"
    finally:
        sys.modules.pop("keras", None)
    assert os.environ.get("KERAS_BACKEND") == given
