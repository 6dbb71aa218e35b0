"""Tests for the crash-safe periodic checkpoints and their user plug-ins."""

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from autocnnp.components.checkpoints import periodic as ck
from autocnnp.core.errors import JobError, Location
from autocnnp.core.files import atomic_write
from autocnnp.engine.job import Setting
from autocnnp.engine.values import bind
from autocnnp.generator.points import registry


def Periodic(*, directory, rank, plugins=None, **config):
    """The periodic checkpointer as the generator builds it: its Config, then the runtime objects."""
    return ck.Periodic(ck.Config(**config), directory=directory, rank=rank, plugins=plugins)


def make_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Conv2d(2, 2, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(1, 1, 5, 5)).sum().backward()
    opt.step()
    return {"epoch": seed, "model": model.state_dict(), "optimizer": opt.state_dict()}


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_round_trip_model_and_optimizer(tmp_path):
    state = make_state(3)
    ckpt = Periodic(directory=tmp_path / "ck", rank=0)
    path = ckpt.save(state, 3)
    assert path == tmp_path / "ck" / "ckpt-epoch0004.pt"
    loaded = ckpt.load()
    assert same(loaded, state)
    # the loaded state drives a fresh model and optimizer
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Conv2d(2, 2, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.load_state_dict(loaded["model"])
    opt.load_state_dict(loaded["optimizer"])
    assert same(model.state_dict(), state["model"])
    assert same(torch.load(path, weights_only=False), state)
    assert names(tmp_path / "ck") == ["ckpt-epoch0004.pt", "latest"]


def test_nothing_to_resume_and_resume_off(tmp_path):
    ckpt = Periodic(directory=tmp_path / "none", rank=0)
    assert ckpt.latest() is None and ckpt.load() is None
    ckpt.save({"a": 1}, 0)
    off = Periodic(directory=tmp_path / "none", rank=0, resume=False)
    assert off.load() is None
    assert off.latest() is not None


def test_keep_rotation_and_latest_pointer(tmp_path):
    ckpt = Periodic(directory=tmp_path, rank=0, keep=2)
    for epoch in range(5):
        ckpt.save({"epoch": epoch}, epoch)
        assert (tmp_path / "latest").read_text().strip() == f"ckpt-epoch{epoch + 1:04d}.pt"
        assert ckpt.latest() == tmp_path / f"ckpt-epoch{epoch + 1:04d}.pt"
    assert names(tmp_path) == ["ckpt-epoch0004.pt", "ckpt-epoch0005.pt", "latest"]
    assert ckpt.load() == {"epoch": 4}
    one = Periodic(directory=tmp_path, rank=0, keep=1)
    one.save({"epoch": 5}, 5)
    assert names(tmp_path) == ["ckpt-epoch0006.pt", "latest"]


def test_resaving_an_epoch_replaces_it(tmp_path):
    ckpt = Periodic(directory=tmp_path, rank=0)
    ckpt.save({"v": 1}, 2)
    ckpt.save({"v": 2}, 2)
    assert ckpt.load() == {"v": 2}
    assert names(tmp_path) == ["ckpt-epoch0003.pt", "latest"]


def test_non_zero_rank_writes_nothing_but_reads(tmp_path):
    other = Periodic(directory=tmp_path / "ck", rank=1)
    assert other.save({"x": 1}, 0) is None
    assert not (tmp_path / "ck").exists()
    Periodic(directory=tmp_path / "ck", rank=0).save({"x": 2}, 0)
    assert other.load() == {"x": 2}


def test_due():
    every3 = Periodic(directory=Path("unused"), rank=0, every_epochs=3)
    assert [e for e in range(10) if every3.due(e, last_epoch=9)] == [2, 5, 8, 9]
    every1 = Periodic(directory=Path("unused"), rank=0)
    assert all(every1.due(e, 4) for e in range(5))


@pytest.mark.parametrize("name,text,problem", [("every_epochs", "0", "at least 1"), ("keep", "0", "at least 1"),
                                               ("keep", "1.5", "whole number"), ("resume", "yes please", "boolean")])
def test_invalid_settings_are_refused_where_written(name, text, problem):
    where = Location(Path("job.xml"), 21, 11)
    with pytest.raises(JobError, match=rf"job.xml:21:11: {name} .*{problem}"):
        bind(ck.Config, [Setting(name, text, where)], Path("."), "checkpoint 'periodic'")


# -- crashes -------------------------------------------------------------------------------

def crash_on_call(monkeypatch, target, attr, n):
    """Make the n-th call (1-based) of target.attr raise, after letting the earlier ones through."""
    real = getattr(target, attr)
    calls = {"n": 0}

    def fake(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise OSError(f"simulated crash in {attr}")
        return real(*args, **kwargs)

    monkeypatch.setattr(target, attr, fake)


def partial_torch_save(obj, f, *args, **kwargs):
    f.write(b"PK\x03\x04 half a checkpoint")
    raise OSError("disk full while writing")


@pytest.mark.parametrize("crash", ["torch.save", "fsync", "replace-ckpt", "fsync-pointer", "replace-pointer"])
def test_crash_mid_save_keeps_previous_latest(tmp_path, monkeypatch, crash):
    ckpt = Periodic(directory=tmp_path, rank=0, keep=1)
    before = make_state(1)
    ckpt.save(before, 1)
    if crash == "torch.save":
        monkeypatch.setattr(torch, "save", partial_torch_save)
    elif crash == "fsync":
        crash_on_call(monkeypatch, os, "fsync", 1)
    elif crash == "replace-ckpt":
        crash_on_call(monkeypatch, os, "replace", 1)
    elif crash == "fsync-pointer":  # fsyncs: ckpt file, folder, pointer file
        crash_on_call(monkeypatch, os, "fsync", 3)
    else:
        crash_on_call(monkeypatch, os, "replace", 2)
    with pytest.raises(OSError):
        ckpt.save(make_state(2), 2)
    monkeypatch.undo()
    assert not [n for n in names(tmp_path) if n.endswith(".tmp")]  # temp files cleaned up
    assert ckpt.latest() == tmp_path / "ckpt-epoch0002.pt"
    assert same(ckpt.load(), before)
    # the next save works and rotation then drops the older files
    ckpt.save(make_state(3), 3)
    assert names(tmp_path) == ["ckpt-epoch0004.pt", "latest"]


def test_stray_and_truncated_temp_files_are_ignored(tmp_path):
    ckpt = Periodic(directory=tmp_path, rank=0)
    ckpt.save({"ok": 1}, 1)
    good = (tmp_path / "ckpt-epoch0002.pt").read_bytes()
    (tmp_path / ".ckpt-epoch0003.pt.999.abcd.tmp").write_bytes(good[: len(good) // 2])
    (tmp_path / ".latest.999.abcd.tmp").write_text("ckpt-epoch0003.pt\n")
    (tmp_path / "ckpt-epoch0010.pt.tmp").write_bytes(b"junk")
    assert ckpt.latest() == tmp_path / "ckpt-epoch0002.pt"
    assert ckpt.load() == {"ok": 1}
    (tmp_path / "latest").unlink()  # even without the pointer, temp files are never candidates
    assert ckpt.latest() == tmp_path / "ckpt-epoch0002.pt"
    ckpt.save({"ok": 2}, 2)  # a successful save sweeps the crash leftovers of our own naming
    assert ".ckpt-epoch0003.pt.999.abcd.tmp" not in names(tmp_path)
    assert ".latest.999.abcd.tmp" not in names(tmp_path)


def test_pointer_to_missing_or_garbage_falls_back_to_newest(tmp_path):
    ckpt = Periodic(directory=tmp_path, rank=0, keep=5)
    for e in (1, 2, 3):
        ckpt.save({"e": e}, e)
    (tmp_path / "ckpt-epoch0004.pt").unlink()
    assert ckpt.latest() == tmp_path / "ckpt-epoch0003.pt"
    assert ckpt.load() == {"e": 2}
    (tmp_path / "latest").write_text("../../etc/passwd\n")
    assert ckpt.latest() == tmp_path / "ckpt-epoch0003.pt"


def test_unreadable_latest_falls_back_to_older(tmp_path):
    ckpt = Periodic(directory=tmp_path, rank=0, keep=5)
    ckpt.save({"e": 1}, 1)
    ckpt.save({"e": 2}, 2)
    (tmp_path / "ckpt-epoch0003.pt").write_bytes(b"damaged")
    with pytest.warns(RuntimeWarning, match="cannot be read"):
        assert ckpt.load() == {"e": 1}


KILL_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    from autocnnp.components.checkpoints.periodic import Config, Periodic
    ckpt = Periodic(Config(), directory=sys.argv[1], rank=0)
    ckpt.save({"epoch": 1, "w": torch.arange(1000.0)}, 1)
    real = torch.save
    def dying_save(obj, f, *a, **k):
        f.write(b"PK\\x03\\x04 truncated")
        f.flush()
        os._exit(9)          # killed mid-write: no cleanup, no exception handlers
    torch.save = dying_save
    ckpt.save({"epoch": 2}, 2)
""")


@pytest.mark.slow
def test_process_killed_mid_save(tmp_path):
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(tmp_path)])
    assert proc.returncode == 9
    leftovers = [n for n in names(tmp_path) if n.endswith(".tmp")]
    assert len(leftovers) == 1  # the truncated temp file is still there
    ckpt = Periodic(directory=tmp_path, rank=0)
    assert ckpt.latest() == tmp_path / "ckpt-epoch0002.pt"
    state = ckpt.load()
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.arange(1000.0))


# -- plug-ins ------------------------------------------------------------------------------

class HalveOnPlateau:
    """A class plug-in with state: halves lr_scale when the loss stops improving."""

    def __init__(self):
        self.best = float("inf")
        self.calls = []

    def on_epoch_end(self, epoch, metrics, state):
        self.calls.append(epoch)
        if metrics["loss"] >= self.best:
            state.lr_scale *= 0.5
            for group in state.optimizer.param_groups:
                group["lr"] *= 0.5
        self.best = min(self.best, metrics["loss"])

    def state_dict(self):
        return {"best": self.best}

    def load_state_dict(self, d):
        self.best = d["best"]


def trainer_state(lr=0.1):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    return SimpleNamespace(optimizer=opt, lr_scale=1.0)


def test_plugin_hooks_class_and_function(tmp_path):
    seen = []

    def log_epoch(epoch, metrics, state):
        seen.append((epoch, metrics["loss"], state.lr_scale))

    ckpt = Periodic(directory=tmp_path, rank=0, plugins={"LRSchedule": HalveOnPlateau, "log": log_epoch})
    plugin = ckpt.plugins["LRSchedule"].obj
    assert isinstance(plugin, HalveOnPlateau)  # classes are instantiated once
    state = trainer_state()
    for epoch, loss in enumerate([1.0, 0.8, 0.9, 0.7]):
        ckpt.on_epoch_end(epoch, {"loss": loss}, state)
    assert plugin.calls == [0, 1, 2, 3]
    assert state.lr_scale == 0.5
    assert state.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert seen == [(0, 1.0, 1.0), (1, 0.8, 1.0), (2, 0.9, 0.5), (3, 0.7, 0.5)]  # job order: class first


def test_plugin_object_and_hookless_plugins(tmp_path):
    obj = HalveOnPlateau()
    stateless = type("Stateless", (), {})
    ckpt = Periodic(directory=tmp_path, rank=0, plugins={"obj": obj, "nothing": stateless})
    assert ckpt.plugins["obj"].obj is obj
    ckpt.on_epoch_end(0, {"loss": 1.0}, trainer_state())
    assert obj.calls == [0]
    assert ckpt.plugin_state() == {"obj": {"best": 1.0}}
    with pytest.raises(TypeError, match="plug-in 'bad'"):
        Periodic(directory=tmp_path, rank=0, plugins={"bad": 3})


def test_plugin_errors_name_the_plugin(tmp_path):
    def broken(epoch, metrics, state):
        raise KeyError("dice")

    ckpt = Periodic(directory=tmp_path, rank=0, plugins={"Broken": broken})
    with pytest.raises(KeyError) as info:
        ckpt.on_epoch_end(4, {}, trainer_state())
    assert any("Broken" in note for note in info.value.__notes__)


def test_plugin_state_round_trip_inside_checkpoint(tmp_path):
    ckpt = Periodic(directory=tmp_path, rank=0, plugins={"LRSchedule": HalveOnPlateau})
    ckpt.on_epoch_end(0, {"loss": 0.3}, trainer_state())
    ckpt.save({"model": {}, "plugins": ckpt.plugin_state()}, 0)

    resumed = Periodic(directory=tmp_path, rank=1, plugins={"LRSchedule": HalveOnPlateau})
    assert resumed.plugins["LRSchedule"].obj.best == float("inf")
    resumed.load_plugin_state(resumed.load()["plugins"])
    assert resumed.plugins["LRSchedule"].obj.best == 0.3
    with pytest.warns(RuntimeWarning, match="'Gone'"):
        resumed.load_plugin_state({"Gone": {"x": 1}})


def test_plugins_from_a_user_file_through_the_registry(tmp_path):
    (tmp_path / "ckpt1.py").write_text(textwrap.dedent("""
        class LRSchedule:
            def __init__(self):
                self.n = 0
            def on_epoch_end(self, epoch, metrics, state):
                self.n += 1
                state.lr_scale = 0.1 if metrics["dice"] < 0.5 else 1.0
            def state_dict(self):
                return {"n": self.n}
            def load_state_dict(self, d):
                self.n = d["n"]
    """))
    where = Location(tmp_path / "job.xml", 19, 18)
    entry = registry("checkpoint").from_file(tmp_path / "ckpt1.py", "LRSchedule", where)
    periodic = registry("checkpoint").get("periodic", where)
    assert [f.name for f in periodic.config.__dataclass_fields__.values()] == ["every_epochs", "keep", "resume",
                                                                            "best_metric"]
    ckpt = periodic.load()(periodic.config(), directory=tmp_path / "ck", rank=0, plugins={"LRSchedule": entry.load()})
    state = trainer_state()
    ckpt.on_epoch_end(0, {"dice": 0.2}, state)
    assert state.lr_scale == 0.1
    assert ckpt.plugin_state() == {"LRSchedule": {"n": 1}}


def test_atomic_helper_leaves_target_untouched_on_error(tmp_path):
    target = tmp_path / "latest"
    target.write_text("old\n")

    def boom(f):
        f.write(b"new")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert target.read_text() == "old\n"
    assert names(tmp_path) == ["latest"]


def test_save_order_is_durable(tmp_path, monkeypatch):
    """Data fsynced before its rename; the pointer moves only after the checkpoint is in place."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", Path(dst).name))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    Periodic(directory=tmp_path, rank=0).save({"x": 1}, 7)
    assert events == [("fsync", "file"), ("replace", "ckpt-epoch0008.pt"), ("fsync", "dir"),
                      ("fsync", "file"), ("replace", "latest"), ("fsync", "dir")]


def test_checkpoint_file_names_what_predict_pretrained_and_the_zoo_load(tmp_path):
    """A run folder offers its best checkpoint, else its latest; pointer and record files name their file."""
    from autocnnp.core.rundir import checkpoint_file

    run = tmp_path / "run"
    c = Periodic(directory=run / "checkpoints", rank=0, every_epochs=1, keep=2)
    c.save(make_state(0), epoch=0)
    c.save(make_state(1), epoch=1)
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    assert checkpoint_file(run) == checkpoint_file(run / "checkpoints") == latest
    assert checkpoint_file(run / "checkpoints" / "latest") == latest
    c.save_best(make_state(1), epoch=1, metrics={"dice_fg": 0.5})
    best = run / "checkpoints" / "ckpt-best.pt"
    assert checkpoint_file(run) == checkpoint_file(run / "checkpoints" / "best") == best
    assert checkpoint_file(run / "checkpoints" / "latest") == latest  # the pointer still names the newest
    assert checkpoint_file(latest) == latest
    (run / "checkpoints" / "latest").write_text("../../etc/passwd\n")
    assert checkpoint_file(run / "checkpoints" / "latest") == run / "checkpoints" / "latest"


def test_a_best_metric_the_run_never_reports_is_refused_before_training(tmp_path):
    from autocnnp.core.errors import DataError
    from autocnnp.training.metrics import SegEval

    reported = SegEval(4, ("background", "edema", "core", "rim")).names()
    assert {"dice_fg", "dice/edema", "iou/rim", "mean_iou"} <= reported
    Periodic(directory=tmp_path, rank=0, best_metric="dice/edema").check_metrics(reported)
    Periodic(directory=tmp_path, rank=0, best_metric="").check_metrics(reported)  # no best kept: nothing read
    with pytest.raises(DataError, match=r"best_metric 'dice/edma' is not a metric this run reports\. Hint: did you "
                                        r"mean 'dice/edema'"):
        Periodic(directory=tmp_path, rank=0, best_metric="dice/edma").check_metrics(reported)
