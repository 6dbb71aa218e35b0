"""Tests for the U-Net and FCN-8s architectures."""

from pathlib import Path

import pytest
import torch

from autocnnp.components.architectures import fcn, resunet3d, unet, unet3d
from autocnnp.components.architectures.fcn import FCN
from autocnnp.components.architectures.unet import UNet
from autocnnp.core.errors import JobError, Location
from autocnnp.engine.job import Setting
from autocnnp.engine.values import bind
from autocnnp.generator.points import registry
from autocnnp.generator.protocols import SizeRule


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
@pytest.mark.parametrize("depth,size", [(1, (5, 7)), (2, (6, 10)), (3, (8, 12)), (4, (16, 8))])
def test_unet_output_shape(depth, size, norm):
    model = UNet(2, 3, depth=depth, base_channels=4, norm=norm)
    out = model(torch.randn(2, 2, *size))
    assert out.shape == (2, 3, *size)


def test_unet_parameter_count_by_hand():
    # depth 2, base 2, 1 input channel, 1 class, no norm (convs carry a bias):
    # level 0: conv 1->2 (1*2*9+2=20) + conv 2->2 (2*2*9+2=38)        = 58
    # level 1: conv 2->4 (2*4*9+4=76) + conv 4->4 (4*4*9+4=148)       = 224
    # up: ConvTranspose 4->2, k=2 (4*2*4+2=34)                         = 34
    # decoder: conv 4->2 (4*2*9+2=74) + conv 2->2 (38)                 = 112
    # head: 1x1 conv 2->1 (2+1=3)                                      = 3
    assert n_params(UNet(1, 1, depth=2, base_channels=2, norm="none")) == 431


def test_parameter_count_grows_with_width():
    assert n_params(UNet(1, 2, depth=3, base_channels=4, norm="batch")) < n_params(
        UNet(1, 2, depth=3, base_channels=8, norm="batch")
    )
    assert n_params(FCN(1, 2, width=1 / 32, norm="none")) < n_params(FCN(1, 2, width=1 / 16, norm="none"))


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
@pytest.mark.parametrize("size", [(32, 32), (64, 32)])
def test_fcn_output_shape(size, norm):
    model = FCN(3, 4, width=1 / 16, norm=norm)
    out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 4, *size)


def test_fcn_channels_follow_vgg16_scaled_by_width():
    convs = [m for m in FCN(1, 2, width=0.25, norm="none").modules() if isinstance(m, torch.nn.Conv2d)]
    encoder = [c.out_channels for c in convs[:13]]
    assert encoder == [16, 16, 32, 32, 64, 64, 64, 128, 128, 128, 128, 128, 128]
    tiny = [m for m in FCN(1, 2, width=0.001, norm="none").modules() if isinstance(m, torch.nn.Conv2d)]
    assert {c.out_channels for c in tiny[:13]} == {1}


def test_fcn_upsampling_starts_bilinear():
    # Each output pixel away from the border mixes two input pixels per axis
    # with weights summing to 1, so a constant map stays constant there.
    up = FCN(1, 2, width=1 / 64, norm="none").up_final
    out = up(torch.ones(1, 2, 4, 4))
    assert out.shape == (1, 2, 32, 32)
    torch.testing.assert_close(out[..., 4:-4, 4:-4], torch.ones(1, 2, 24, 24))


@pytest.mark.parametrize(
    "model,size,multiple",
    [
        (UNet(1, 2, depth=3, base_channels=2, norm="batch"), (10, 12), 4),
        (UNet(1, 2, depth=4, base_channels=2, norm="batch"), (16, 12), 8),
        (FCN(1, 2, width=1 / 64, norm="none"), (48, 32), 32),
    ],
)
def test_bad_input_size(model, size, multiple):
    with pytest.raises(ValueError, match=f"multiples of {multiple}"):
        model(torch.randn(1, 1, *size))


WHERE = Location(Path("job.xml"), 9, 5)


@pytest.mark.parametrize("module", [unet, fcn, unet3d])
def test_bad_norm_is_refused_where_the_job_writes_it(module):
    with pytest.raises(JobError, match=r"job.xml:9:5: 'layer' is not a valid norm.*valid choices are 'batch'"):
        bind(module.Config, [Setting("norm", "layer", WHERE)], Path("."), "architecture")


def test_bad_depth_is_refused_where_the_job_writes_it():
    for depth in ("0", "9"):
        with pytest.raises(JobError, match="depth is .*, it must be between 1 and 8"):
            bind(unet.Config, [Setting("depth", depth, WHERE)], Path("."), "architecture")


@pytest.mark.parametrize(
    "model,size",
    [
        (UNet(2, 3, depth=3, base_channels=4, norm="batch"), (8, 8)),
        (FCN(2, 3, width=1 / 16, norm="batch"), (32, 32)),
    ],
)
def test_gradients_reach_every_parameter(model, size):
    torch.manual_seed(0)
    model(torch.randn(2, 2, *size)).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_build_passes_params():
    model = unet.build(unet.Config(depth=2, base_channels=4, norm="group"), in_channels=3, num_classes=5)
    assert isinstance(model, UNet)
    assert model(torch.randn(1, 3, 4, 4)).shape == (1, 5, 4, 4)
    model = fcn.build(fcn.Config(width=1 / 32), in_channels=3, num_classes=5)
    assert isinstance(model, FCN)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5, 32, 32)


# Settings of every built-in that keep it small, and vary its size rule; a .keras file ("keras") is a model of
# the user's, which declares no rule.
VARIANTS = {"unet": [[("base_channels", "2"), ("norm", "none"), ("depth", d)] for d in ("1", "3", "4")],
            "fcn": [[("width", "0.01")]],
            **{name: [[("base_channels", "2"), ("norm", "none"), ("depth", d)] for d in ("1", "3")]
               for name in ("unet3d", "resunet3d")}}


@pytest.mark.parametrize("name", [n for n in registry("architecture_injection").names("torch") if n != "keras"])
def test_every_builtin_architecture_takes_exactly_the_sizes_its_rule_declares(name):
    """The engine refuses a data size by the rule the architecture's Config declares: it must be the network's."""
    entry = registry("architecture_injection").builtin(name)
    for settings in VARIANTS[name]:
        config = bind(entry.config, [Setting(k, v, WHERE) for k, v in settings], Path("."), name)
        rule = config.input_sizes()
        assert isinstance(rule, SizeRule)
        model = entry.load()(config, in_channels=1, num_classes=2).eval()
        taken = sorted({*rule.nearest(rule.multiple + 1), *rule.nearest(3 * rule.multiple - 1)})
        assert rule.dimensions in (2, 3)
        rest = (taken[0],) * (rule.dimensions - 1)  # the other sides: one the rule takes
        with torch.no_grad():
            for side in taken:
                assert rule.takes(side) and model(torch.zeros(1, 1, side, *rest)).shape[2:] == (side, *rest)
            for side in {taken[0] + 1, taken[-1] - 1} - set(taken):
                assert not rule.takes(side)
                with pytest.raises(ValueError, match=f"multiples of {rule.multiple}"):
                    model(torch.zeros(1, 1, side, *rest))


@pytest.mark.parametrize(("rule", "side", "nearest"), [
    (SizeRule(4), 30, [28, 32]), (SizeRule(4), 2, [4]), (SizeRule(16, 48), 32, [48]), (SizeRule(16, 48), 70, [64, 80]),
    (SizeRule(), 31, [31, 32]),
])
def test_size_rule_names_the_nearest_sides_it_takes(rule, side, nearest):
    assert rule.nearest(side) == nearest and all(rule.takes(s) for s in nearest)


# --- 3D -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("module", [unet3d, resunet3d])
@pytest.mark.parametrize("norm", ["instance", "batch", "group", "none"])
def test_3d_networks_keep_the_patch_shape(module, norm):
    model = module.build(module.Config(depth=3, base_channels=4, norm=norm), in_channels=2, num_classes=3)
    assert model(torch.randn(2, 2, 4, 8, 12)).shape == (2, 3, 4, 8, 12)


def test_3d_defaults_are_instance_norm_without_deep_supervision():
    config = unet3d.Config()
    assert (config.norm, config.deep_supervision) == ("instance", False)
    assert config.input_sizes() == SizeRule(8, 1, 3, deepest_voxels=2, reason="depth 4, instance norm: one voxel has "
                                            "no variance")  # a patch of 8x8x8 would leave one voxel: refused
    model = resunet3d.build(resunet3d.Config(depth=2, base_channels=2), in_channels=1, num_classes=2)
    assert any(isinstance(m, torch.nn.InstanceNorm3d) for m in model.modules())
    assert unet.Config().input_sizes().dimensions == 2


def test_the_residual_unet_adds_its_input_to_every_block():
    plain = n_params(unet3d.build(unet3d.Config(depth=2, base_channels=2, norm="none"), in_channels=1, num_classes=2))
    residual = resunet3d.build(resunet3d.Config(depth=2, base_channels=2, norm="none"), in_channels=1, num_classes=2)
    # the same convolutions, plus a 1x1x1 projection where a block changes the channels: 1->2, 2->4, 8->4... by hand:
    # down 1->2 (2 + 2 = 4), down 2->4 (8 + 4 = 12), up_conv 4->2 (8 + 2 = 10)
    assert n_params(residual) == plain + 4 + 12 + 10
    block = residual.down[1]
    with torch.no_grad():
        for p in block.body.parameters():  # the convolutions give 0: the block passes its (projected) input on
            p.zero_()
    x = torch.randn(1, 2, 2, 2, 2)
    torch.testing.assert_close(block(x), torch.relu(block.skip(x)))
    assert block(x).abs().sum() > 0


def test_deep_supervision_returns_lower_levels_in_training_only():
    model = unet3d.build(unet3d.Config(depth=4, base_channels=2, deep_supervision=True), in_channels=1, num_classes=3)
    outputs = model.train()(torch.randn(2, 1, 16, 16, 8))
    assert [tuple(o.shape) for o in outputs] == [(2, 3, 16, 16, 8), (2, 3, 8, 8, 4), (2, 3, 4, 4, 2)]
    assert model.eval()(torch.randn(2, 1, 16, 16, 8)).shape == (2, 3, 16, 16, 8)
    plain = unet3d.build(unet3d.Config(depth=4, base_channels=2), in_channels=1, num_classes=3)
    assert set(model.state_dict()) - set(plain.state_dict()) == {f"auxiliary.{i}.{p}" for i in (0, 1)
                                                                   for p in ("weight", "bias")}


def test_2d_unet_keeps_its_parameter_names():
    """2D checkpoints written before the blocks were shared load into the U-Net built today."""
    names = set(UNet(1, 2, depth=2, base_channels=2, norm="batch").state_dict())
    assert {"down.0.0.weight", "down.0.1.running_mean", "up.0.weight", "up_conv.0.3.weight", "head.bias"} <= names
