"""The contracts of protocols.py that the trainers, predict and freeze="encoder" rely on: what each framework
supplies to the shared run, the volume transform, the encoder; and the run built with keyword arguments."""

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest
import torch

from autocnnp.components.architectures.fcn import FCN
from autocnnp.components.architectures.unet import UNet
from autocnnp.components.datasets.decathlon import SliceTransform
from autocnnp.generator.protocols import Encoded, TrainingSteps, VolumeTransform
from autocnnp.training import run, trainer


def declared(protocol: type) -> set[str]:
    """The members a protocol declares: its methods and annotated attributes."""
    return {n for n, v in vars(protocol).items() if inspect.isfunction(v)} | set(protocol.__annotations__)


def supplied(cls: type, protocol: type) -> set[str]:
    """The members of ``protocol`` that ``cls`` defines itself (not inherited from the protocol)."""
    own = set().union(*(vars(c) for c in cls.__mro__ if c is not protocol and c is not object))
    own |= {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    return declared(protocol) & own


def test_the_run_is_built_with_keywords_and_holds_no_framework_part():
    fields = dataclasses.fields(run.Run)
    assert all(f.kw_only for f in fields)
    with pytest.raises(TypeError):
        run.Run(*range(len(fields)))
    assert not {"model", "scaler", "autocast", "train_step", "inference"} & {f.name for f in fields}


def class_in_source(path: Path, name: str) -> tuple[list[str], set[str]]:
    """The bases and the methods and attributes of class ``name`` in the file ``path``, read without
    importing it (keras_trainer.py imports TensorFlow and sets Keras' backend for the whole process)."""
    tree = ast.parse(path.read_text())
    cls = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == name)
    members = {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}
    members |= {n.attr for n in ast.walk(cls) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)
                and isinstance(n.value, ast.Name) and n.value.id == "self"}
    return [ast.unparse(b) for b in cls.bases], members


def test_torch_supplies_the_steps_the_loop_drives():
    assert issubclass(trainer.TorchSteps, TrainingSteps)
    assert supplied(trainer.TorchSteps, TrainingSteps) == declared(TrainingSteps) - {"optimizer"}
    assert "optimizer" in inspect.signature(trainer.TorchSteps).parameters


def test_tensorflow_supplies_the_steps_the_loop_drives():
    bases, members = class_in_source(Path(trainer.__file__).with_name("keras_trainer.py"), "KerasSteps")
    assert bases == ["TrainingSteps"]
    assert declared(TrainingSteps) <= members


def test_torch_steps_save_and_restore_the_network_optimizer_and_loss_scaler():
    from autocnnp.generator.protocols import Strategy
    from autocnnp.training.precision import mixed_precision

    def steps(seed: int) -> trainer.TorchSteps:
        torch.manual_seed(seed)
        model = torch.nn.Conv2d(1, 2, 1)
        autocast, scaler = mixed_precision("fp32", torch.device("cpu"))
        return trainer.TorchSteps(model=model, optimizer=torch.optim.Adam(model.parameters()), loss_fn=lambda a, b: (
            a.float() - b).square().mean(), strategy=Strategy(world=None, device=torch.device("cpu")),
            autocast=autocast, scaler=scaler, transfer=None)

    trained, fresh = steps(0), steps(1)
    x = torch.randn(2, 1, 4, 4)
    trained.begin_steps()
    trained.step(x, torch.zeros(2, 2, 4, 4), 0.01)
    fresh.load_state_dict(trained.state_dict(), None)
    assert fresh.current_lr() == trained.current_lr() == 0.01
    assert torch.equal(fresh.end_steps()(x), trained.end_steps()(x))
    assert set(trained.state_dict()) == {"model", "optimizer", "grad_scaler"}


def test_the_decathlon_transform_is_the_volume_transform_predict_uses():
    transform = SliceTransform.from_card({"size": 8, "modalities": None, "normalise": True}, 3)
    assert isinstance(transform, VolumeTransform)
    assert supplied(SliceTransform, VolumeTransform) == declared(VolumeTransform)
    assert SliceTransform.from_card(transform.card(), 3) == transform
    assert transform.to_slices(torch.ones(4, 4, 5).numpy(), "x.nii.gz").shape == (5, 1, 8, 8)


def test_the_decathlon_3d_transform_is_a_volume_transform_too():
    from autocnnp.components.datasets.volume3d import PatchTransform

    card = {"dimension": "3d", "patch_size": [8, 16, 16], "spacing": [1.0, 1.0, 2.0], "overlap": 0.5,
            "modalities": [1], "normalise": True}
    transform = PatchTransform.from_card(card, 3)
    assert isinstance(transform, VolumeTransform)
    assert supplied(PatchTransform, VolumeTransform) == declared(VolumeTransform)
    assert PatchTransform.from_card(transform.card(), 3) == transform
    assert transform.input_channels(2, "x.nii.gz") == 1


def test_the_built_in_architectures_name_their_encoder():
    for net in (UNet(1, 2, depth=2, base_channels=4, norm="batch"), FCN(1, 2, width=1 / 16, norm="batch")):
        assert isinstance(net, Encoded)
        assert all(isinstance(m, torch.nn.Module) for m in net.encoder())
    assert not isinstance(torch.nn.Conv2d(1, 2, 1), Encoded)


def test_an_encoder_held_as_a_sub_module_is_frozen_not_called(tmp_path):
    """A user network whose encoder is a sub-module named ``encoder`` (as most are written): freeze="encoder" freezes
    it; calling it as the protocol's method would have run its forward pass without an input."""
    from autocnnp.training.pretrained import load_pretrained

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4))
            self.head = torch.nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.head(self.encoder(x))

    torch.save({"model": Net().state_dict()}, tmp_path / "ckpt.pt")
    net = Net()
    transfer = load_pretrained(net, tmp_path / "ckpt.pt", "encoder")
    assert [n for n, p in net.named_parameters() if not p.requires_grad] == ["encoder.0.weight", "encoder.0.bias",
                                                                             "encoder.1.weight", "encoder.1.bias"]
    assert net.head.weight.requires_grad and transfer.frozen_norms == ["encoder.1"]
