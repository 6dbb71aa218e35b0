"""The contracts of protocols.py that the trainers, predict and freeze="encoder" rely on: what each framework
supplies to the shared run, the volume transform, the encoder; and the run built with keyword arguments."""

import dataclasses
import inspect

import pytest
import torch

from autocnnp.components.architectures.fcn import FCN
from autocnnp.components.architectures.unet import UNet
from autocnnp.components.datasets.decathlon import SliceTransform
from autocnnp.generator.protocols import Encoded, TrainingSteps, VolumeTransform
from autocnnp.training import run, trainer
from jobfiles import require_import


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


def steps_classes():
    yield trainer.TorchSteps
    try:
        require_import("tensorflow", "tensorflow", "AUTOCNNP_REQUIRE_TENSORFLOW")
    except pytest.skip.Exception:
        return
    from autocnnp.training import keras_trainer

    yield keras_trainer.KerasSteps


def test_every_framework_supplies_the_steps_the_loop_drives():
    for cls in steps_classes():
        assert issubclass(cls, TrainingSteps)
        missing = declared(TrainingSteps) - supplied(cls, TrainingSteps) - {"optimizer"}
        assert not missing, f"{cls.__name__} leaves {missing} to the protocol's defaults"


def test_torch_steps_save_and_restore_the_network_optimizer_and_loss_scaler():
    from autocnnp.components.strategies import ring_allreduce  # noqa: F401 - the default strategy's module
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


def test_the_built_in_architectures_name_their_encoder():
    for net in (UNet(1, 2, depth=2, base_channels=4, norm="batch"), FCN(1, 2, width=1 / 16, norm="batch")):
        assert isinstance(net, Encoded)
        assert all(isinstance(m, torch.nn.Module) for m in net.encoder())
    assert not isinstance(torch.nn.Conv2d(1, 2, 1), Encoded)
