"""Tests for the learning-rate policies (values checked at hand-computed points)."""

import subprocess
import sys
from pathlib import Path

import pytest

from autocnnp.components.lr_policies import constant, gradual_warmup, grescale, linear_scaling, warmup_step_decay
from autocnnp.components.lr_policies.grescale import grescale_phases
from autocnnp.core.errors import JobError, Location
from autocnnp.engine.job import Setting
from autocnnp.engine.values import bind
from autocnnp.generator.points import registry
from autocnnp.tuning.lr_plot import schedule

RUN = dict(base_lr=0.1, replicas=4, steps_per_epoch=2, total_epochs=100)


def policy(module, run=None, **config):
    """The module's policy with its Config (defaults, or ``config``) and the run's numbers, as Generator.lr_policy builds it."""
    cls = next(v for v in vars(module).values() if isinstance(v, type) and v.__module__ == module.__name__
               and hasattr(v, "rate"))
    return cls(module.Config(**config) if hasattr(module, "Config") else None, **{**RUN, **(run or {})})


def Constant(**run):
    return policy(constant, run)


def LinearScaling(scale=True, **run):
    return policy(linear_scaling, run, scale=scale)


def GradualWarmup(run=None, **config):
    return policy(gradual_warmup, run, **config)


def WarmupStepDecay(run=None, **config):
    return policy(warmup_step_decay, run, **config)


def GreScale(run=None, **config):
    return policy(grescale, run, **config)


def milestones(text, warmup_epochs=0):
    return warmup_step_decay.Config(milestones=text, warmup_epochs=warmup_epochs).milestone_epochs()


def test_constant_ignores_world_size():
    for world in (1, 4, 18):
        p = Constant(replicas=world)
        assert [p.lr(e, s) for e in (0, 5, 99) for s in (0, 1)] == [0.1] * 6
    assert "0.1" in p.describe()


def test_linear_scaling():
    p = LinearScaling()
    assert p.lr(0, 0) == pytest.approx(0.4)
    assert p.lr(50, 1) == pytest.approx(0.4)
    assert LinearScaling(scale=False).lr(0, 0) == pytest.approx(0.1)
    assert "0.4" in p.describe()


def test_gradual_warmup_hand_computed():
    # world 4, base 0.1, 2 steps/epoch, warmup 5 epochs = 10 steps; +0.03 per step
    p = GradualWarmup(warmup_epochs=5)
    assert p.lr(0, 0) == pytest.approx(0.1)
    assert p.lr(0, 1) == pytest.approx(0.13)
    assert p.lr(2, 1) == pytest.approx(0.25)  # global step 5: halfway from 0.1 to 0.4
    assert p.lr(4, 1) == pytest.approx(0.37)
    assert p.lr(5, 0) == pytest.approx(0.4)
    assert p.lr(99, 1) == pytest.approx(0.4)
    assert p.target_lr == pytest.approx(0.4)


def test_gradual_warmup_edge_cases():
    assert GradualWarmup(warmup_epochs=0).lr(0, 0) == pytest.approx(0.4)
    unscaled = GradualWarmup(warmup_epochs=5, scale=False)
    assert [unscaled.lr(e, 0) for e in (0, 3, 6)] == pytest.approx([0.1, 0.1, 0.1])
    single = GradualWarmup({"replicas": 1})
    assert single.lr(2, 1) == pytest.approx(0.1)
    short = GradualWarmup({"total_epochs": 3}, warmup_epochs=5)
    assert "never reached" in short.describe()


def test_warmup_step_decay_milestones():
    p = WarmupStepDecay(warmup_epochs=5, milestones="30,60,80", decay=0.1)
    assert p.lr(0, 0) == pytest.approx(0.1)
    assert p.lr(2, 1) == pytest.approx(0.25)
    assert p.lr(29, 1) == pytest.approx(0.4)
    assert p.lr(30, 0) == pytest.approx(0.04)
    assert p.lr(59, 1) == pytest.approx(0.04)
    assert p.lr(60, 0) == pytest.approx(0.004)
    assert p.lr(80, 0) == pytest.approx(0.0004)
    assert p.lr(99, 1) == pytest.approx(0.0004)
    assert p.milestones == (30, 60, 80)
    assert "30, 60, 80" in p.describe()


def test_warmup_step_decay_other_decay_and_no_milestones():
    p = WarmupStepDecay(warmup_epochs=0, milestones="10; 20", decay=0.5)
    assert [p.lr(e, 0) for e in (0, 10, 20)] == pytest.approx([0.4, 0.2, 0.1])
    none = WarmupStepDecay(milestones="")
    assert none.lr(99, 1) == pytest.approx(0.4)
    late = WarmupStepDecay({"total_epochs": 40})
    assert "beyond" in late.describe()


def test_parse_milestones():
    assert milestones("30,60,80") == (30, 60, 80)
    assert milestones(" 5 , 9 ") == (5, 9)
    assert milestones("") == ()
    assert milestones("7;8") == (7, 8)
    for bad in ("30,x", "60,30", "30,30", "0,10", "-1"):
        with pytest.raises(ValueError, match="milestone"):
            milestones(bad)
    with pytest.raises(ValueError, match="inside the warmup"):
        milestones("3,30", warmup_epochs=5)


def test_grescale_phases():
    # 12 epochs: 5 warmup, 3/7 * 7 = 3 decay epochs (9, 10, 11), stabilisation epochs 5..8
    p = GreScale({"total_epochs": 12}, warmup_epochs=5, stabilisation_scale=1.0, decay_coefficient=0.9)
    assert p.decay_epochs == 3
    assert p.lr(2, 1) == pytest.approx(0.25)
    assert p.lr(5, 0) == pytest.approx(0.4)
    assert p.lr(8, 1) == pytest.approx(0.4)
    # 6 decay steps, lr falls by 0.4 * 0.9 / 6 = 0.06 per step, reaching 0.04 on the last step
    assert p.lr(9, 0) == pytest.approx(0.34)
    assert p.lr(11, 1) == pytest.approx(0.04)
    with pytest.raises(ValueError, match="exceed"):
        GreScale({"total_epochs": 12}, warmup_epochs=5, decay_epochs=8)


def test_grescale_defaults_reduced_stabilisation_and_decay_coefficient():
    p = GreScale({"total_epochs": 12})  # thesis defaults: 5-epoch warmup, 4/7 and 3/7
    assert (p.warmup_epochs, p.decay_epochs) == (5, 3)
    assert p.lr(4, 1) == pytest.approx(0.37)  # warmup still reaches for the scaled target 0.4
    assert p.lr(5, 0) == pytest.approx(0.2)  # stabilisation at half the target
    assert p.lr(11, 1) == pytest.approx(0.02)  # coefficient 0.9: ends at 1/10 of the stabilisation lr
    steep = GreScale({"total_epochs": 12}, decay_coefficient=2.0)  # faster: reaches 0 halfway
    assert steep.lr(10, 1) == pytest.approx(0.0) and steep.lr(9, 0) == pytest.approx(0.2 * (1 - 2 / 6))
    assert grescale_phases(120, 5, None) == (5, 66, 49) and grescale_phases(3, 5, None) == (3, 0, 0)
    assert grescale_phases(12, 6, 2) == (6, 4, 2)


def test_grescale_feedback_extends_warmup_and_lowers_stabilisation():
    p = GreScale({"total_epochs": 12})  # warmup 5 (may grow to 5 + 4 // 2 = 7), decay from epoch 9
    assert p.max_warmup_epochs == 7
    p.on_epoch_end(0, {"valid_loss": 1.0})
    p.on_epoch_end(1, {"valid_loss": 0.9})
    assert p.warmup_epochs == 5 and p.events == []
    before = p.lr(1, 1)
    p.on_epoch_end(2, {"valid_loss": 0.95})  # the loss rose during the warmup: one more warmup epoch
    assert p.warmup_epochs == 6 and p.events == [(2, "warmup", 6)]
    assert p.lr(3, 0) == pytest.approx(p.lr(2, 1) + (0.4 - p.lr(2, 1)) / 7)  # gentler ramp, no jump
    assert p.lr(2, 1) > before and p.lr(5, 1) < 0.4 and p.lr(6, 0) == pytest.approx(0.2)
    p.on_epoch_end(3, {"valid_loss": 0.9})
    p.on_epoch_end(6, {"valid_loss": 0.99})  # a stabilisation epoch got worse: halve the stabilisation lr
    assert p.stabilisation_scale == pytest.approx(0.25) and p.lr(7, 0) == pytest.approx(0.1)
    p.on_epoch_end(9, {"valid_loss": 5.0})  # the decay stage has its fixed schedule
    assert p.stabilisation_scale == pytest.approx(0.25) and p.decay_epochs == 3
    # the state survives a checkpoint: a new policy that loads it answers the same
    q = GreScale({"total_epochs": 12})
    q.load_state_dict(p.state_dict())
    assert [q.lr(e, s) for e in range(12) for s in range(2)] == [p.lr(e, s) for e in range(12) for s in range(2)]
    fixed = GreScale({"total_epochs": 12}, adaptive=False)
    fixed.on_epoch_end(0, {"valid_loss": 1.0})
    fixed.on_epoch_end(1, {"valid_loss": float("nan")})
    assert fixed.state_dict()["events"] == [] and fixed.warmup_epochs == 5


@pytest.mark.parametrize("point,name,text,problem", [
    ("grescale", "stabilisation_scale", "1.5", "at most 1.0"), ("grescale", "decay_coefficient", "0", "greater than 0"),
    ("grescale", "feedback_factor", "1.0", "at most 0.999"), ("grescale", "monitor", "dice", "not a valid monitor"),
    ("grescale", "tolerance", "-1", "at least 0"), ("gradual_warmup", "warmup_epochs", "-1", "at least 0"),
    ("gradual_warmup", "scale", "maybe", "boolean"), ("warmup_step_decay", "decay", "0", "greater than 0"),
    ("warmup_step_decay", "milestones", "80,60", "strictly increasing"),
])
def test_invalid_parameters_are_refused_where_written(point, name, text, problem):
    where = Location(Path("job.xml"), 12, 9)
    entry = registry("lr_policy").get(point, where)
    with pytest.raises(JobError, match=rf"job.xml:12:9: .*{problem}"):
        bind(entry.config, [Setting(name, text, where)], Path("."), point)


def test_settings_that_do_not_fit_the_run_are_refused_by_the_policy():
    with pytest.raises(ValueError, match="max_warmup_epochs"):
        GreScale({"total_epochs": 12}, max_warmup_epochs=3)
    p = GradualWarmup()
    with pytest.raises(ValueError, match="step 2"):
        p.lr(0, 2)
    with pytest.raises(ValueError, match="epoch"):
        p.lr(-1, 0)


def test_schedule_for_plotting():
    p = GradualWarmup(warmup_epochs=1)
    points = schedule(p, total_epochs=3, steps_per_epoch=2)
    assert [e for e, _ in points] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert [lr for _, lr in points] == pytest.approx([0.1, 0.25, 0.4, 0.4, 0.4, 0.4])


def test_registered_and_built_like_the_trainer():
    where = Location(Path("job.xml"), 3, 1)
    lr_policies = registry("lr_policy")
    assert {"constant", "linear_scaling", "gradual_warmup", "warmup_step_decay", "grescale"} <= set(lr_policies.names())
    assert lr_policies.get("constant", where).config is None
    for name, module in [("gradual_warmup", gradual_warmup), ("warmup_step_decay", warmup_step_decay),
                         ("linear_scaling", linear_scaling), ("grescale", grescale)]:
        entry = lr_policies.get(name, where)
        config = bind(entry.config, [], Path("."), name)
        assert entry.load().__module__ == module.__name__
        assert entry.load()(config, **RUN).describe()
    defaults = gradual_warmup.Config()
    assert defaults.warmup_epochs == 5 and defaults.scale is True
    assert linear_scaling.Config().scale is True and grescale.Config().decay_epochs is None


def test_config_binding_from_job_settings():
    where = Location(Path("job.xml"), 7, 5)
    cfg = bind(warmup_step_decay.Config, [Setting("warmup", "2", where), Setting("milestones", "10,20", where),
                                          Setting("gamma", "0.5", where)], Path("."), "lr_policy")
    assert (cfg.warmup_epochs, cfg.milestones, cfg.decay) == (2, "10,20", 0.5)
    with pytest.raises(JobError, match="strictly increasing"):
        bind(warmup_step_decay.Config, [Setting("milestones", "20,10", where)], Path("."), "lr_policy")
    with pytest.raises(JobError, match="at least 0"):
        bind(gradual_warmup.Config, [Setting("warmup_epochs", "-2", where)], Path("."), "lr_policy")
    with pytest.raises(JobError, match="greater than 0"):
        bind(warmup_step_decay.Config, [Setting("decay", "0", where)], Path("."), "lr_policy")


def test_registration_does_not_import_torch():
    code = ("import sys, autocnnp.components.lr_policies.grescale, autocnnp.generator.points as p; "
            "[p.registry('lr_policy').get(n, None).load() for n in p.registry('lr_policy').names()]; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
