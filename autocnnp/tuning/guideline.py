"""The GreScale guideline (thesis section 6.3.3, flowchart Figure 6.3) as a state machine.

1. Apply the GreScale defaults: SGD, initial lr 1e-5, 5-epoch warmup, then 4/7 stabilisation and 3/7
   decay of the remaining epochs (decay coefficient 0.9).
2. Below ``threshold`` ranks (12 in the thesis) just train with them.
3. From ``threshold`` ranks on, compare with the single-rank baseline and walk the five ordered
   actions: decrease the initial lr, increase the lr decay coefficient, increase the warmup period,
   increase the decay-phase period, change the optimizer. Each iteration applies one fixed small
   step of the current action and trains; while the model improves on the previous iteration the
   action is repeated, otherwise the walk moves on to the next action. Models are compared by
   Dice, then mean accuracy, then mean IoU (thesis 6.4: PA and fw IoU are dominated by the
   background class); a difference within ``tolerance`` counts as a tie and the next metric decides.
4. As soon as a run reaches the baseline (compares >= to it), one more run with the same settings
   and the next seed confirms it ("Model validation") and the walk stops.

Steps are cumulative, as in the thesis' tables (a step that made things worse stays when the walk
moves on), unless ``revert_worse`` is set: then the next action starts from the last settings that
improved. Thesis 6.3.3 leaves this open.

The training itself is injected: ``runner(variant) -> metrics`` (the final validation metrics:
``dice``, ``pixel_accuracy``, ``mean_accuracy``, ``mean_iou``, ``fw_iou``). The walk is a pure
function of the runner's answers, so a tune is resumed by replaying it with the answers saved so far
(``cache``) and running only what is missing. ``budget`` caps the number of runs (baseline
included, cached ones counted).
"""

from __future__ import annotations

import hashlib
import json
import math
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

from ..components.hyperparameters.xml_properties import Config as Hyperparameters
from ..components.lr_policies.grescale import Config as GreScaleConfig
from ..components.lr_policies.grescale import grescale_phases
from ..core.metrics import GUIDELINE_PRIORITY
from ..generator.overrides import degree_overrides

DEFAULT_THRESHOLD = 12
MIN_LR = 1e-6  # thesis 6.3.3, after [159]: keep the lr above 1e-6
OPTIMIZERS = typing.get_args(typing.get_type_hints(Hyperparameters)["optimizer"])  # what the job may name


@dataclass(frozen=True)
class Settings:
    """What the guideline tunes: the initial lr, the optimizer and GreScale's stages."""

    lr: float
    optimizer: str
    warmup_epochs: int
    decay_coefficient: float
    decay_epochs: int

    def overrides(self) -> dict[str, str]:
        """The job overrides (generator/overrides.py) that train with these settings."""
        return {"lr_policy": "grescale", "hyperparameters.lr": f"{self.lr:.6g}",
                "hyperparameters.optimizer": self.optimizer, "lr_policy.warmup_epochs": str(self.warmup_epochs),
                "lr_policy.decay_coefficient": f"{self.decay_coefficient:.6g}",
                "lr_policy.decay_epochs": str(self.decay_epochs)}


@dataclass(frozen=True)
class Steps:
    """The fixed small step of each action."""

    lr_factor: float = 0.5  # decrease the initial lr: lr x this (kept >= min_lr)
    decay_step: float = 0.05  # increase the decay coefficient by this
    warmup_step: int = 1  # epochs added to the warmup (taken from the stabilisation stage)
    decay_epochs_step: int = 1  # epochs added to the decay stage (taken from the stabilisation stage)
    min_lr: float = MIN_LR
    optimizers: tuple[str, ...] = OPTIMIZERS


@dataclass(frozen=True)
class Variant:
    """One training run the guideline asks for: a name, the job overrides, the number of ranks."""

    name: str
    overrides: dict[str, str]
    world_size: int

    @property
    def key(self) -> str:
        text = json.dumps({"overrides": self.overrides, "world_size": self.world_size}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:10]


@dataclass
class Row:
    """One line of the iteration table."""

    iteration: int | str
    action: str
    metrics: dict[str, float]
    settings: Settings | None
    world_size: int
    run: str
    reached: bool | None = None
    improved: bool | None = None


def _stab(s: Settings, total_epochs: int) -> int:
    return total_epochs - s.warmup_epochs - s.decay_epochs


def decrease_lr(s: Settings, steps: Steps, total_epochs: int) -> Settings | None:
    lr = s.lr * steps.lr_factor
    return replace(s, lr=lr) if lr >= steps.min_lr * (1 - 1e-9) else None


def increase_decay(s: Settings, steps: Steps, total_epochs: int) -> Settings | None:
    return replace(s, decay_coefficient=round(s.decay_coefficient + steps.decay_step, 10))


def increase_warmup(s: Settings, steps: Steps, total_epochs: int) -> Settings | None:
    ok = _stab(s, total_epochs) - steps.warmup_step >= 0
    return replace(s, warmup_epochs=s.warmup_epochs + steps.warmup_step) if ok else None


def increase_decay_period(s: Settings, steps: Steps, total_epochs: int) -> Settings | None:
    ok = _stab(s, total_epochs) - steps.decay_epochs_step >= 0
    return replace(s, decay_epochs=s.decay_epochs + steps.decay_epochs_step) if ok else None


def change_optimizer(s: Settings, steps: Steps, total_epochs: int, tried: set[str] | None = None) -> Settings | None:
    tried = (tried or set()) | {s.optimizer}
    left = [o for o in steps.optimizers if o not in tried]
    return replace(s, optimizer=left[0]) if left else None


# The five ordered workflow actions of Figure 6.3: (key, label as in Tables 6.1-6.10, step).
ACTIONS: tuple[tuple[str, str, Callable], ...] = (
    ("decrease_lr", "Decrease the initial Lr value", decrease_lr),
    ("increase_decay", "Increase the Lr decay coefficient", increase_decay),
    ("increase_warmup", "Increase the warmup period", increase_warmup),
    ("increase_decay_period", "Increase the decay phase period", increase_decay_period),
    ("change_optimizer", "Change the optimizer", change_optimizer),
)
DEFAULTS_LABEL = "Apply default parameters"
VALIDATION_LABEL = "Model validation"
BASELINE_LABEL = "Baseline model performances"


def compare(a: dict, b: dict, tolerance: float) -> int:
    """+1 if ``a`` is the better model, -1 if ``b`` is, 0 if they tie: Dice, then mean accuracy, then
    mean IoU; differences within ``tolerance`` are ties. A missing or NaN metric loses."""
    for name in GUIDELINE_PRIORITY:
        x, y = _num(a.get(name)), _num(b.get(name))
        if x - y > tolerance:
            return 1
        if y - x > tolerance:
            return -1
    return 0


def _num(v) -> float:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return -math.inf
    return v if math.isfinite(v) else -math.inf


class BudgetExhausted(Exception):
    pass


@dataclass
class Outcome:
    """The result of a (possibly partial) tune."""

    rows: list[Row]
    baseline: Row | None
    status: str
    finished: bool
    best: Row | None
    runs: int
    branch: str


@dataclass
class Guideline:
    """Walks the flowchart; ``runner(variant) -> metrics`` trains. ``cache`` maps a variant's name to
    ``{"key": variant.key, "metrics": ...}`` for runs done before (a resumed tune)."""

    runner: Callable[[Variant], dict]
    world_size: int  # the ranks (the parallelism degree) to tune for
    total_epochs: int
    initial: Settings
    seed: int = 0
    threshold: int = DEFAULT_THRESHOLD
    budget: int | None = None
    tolerance: float = 0.001
    steps: Steps = field(default_factory=Steps)
    revert_worse: bool = False
    baseline_metrics: dict | None = None
    cache: dict = field(default_factory=dict)
    on_run: Callable[[Variant, dict, bool], None] | None = None  # after each run: (variant, metrics, cached)
    processes: int | None = None  # real processes per run, each emulating ranks / processes (None: one per rank)

    def __post_init__(self):
        self.runs = 0

    def execute(self, name: str, overrides: dict[str, str], world_size: int) -> dict:
        if self.budget is not None and self.runs >= self.budget:
            raise BudgetExhausted(name)
        variant = Variant(name, dict(overrides), world_size)
        saved = self.cache.get(name)
        cached = saved is not None and saved.get("key") == variant.key
        metrics = dict(saved["metrics"]) if cached else dict(self.runner(variant))
        self.runs += 1
        self.cache[name] = {"key": variant.key, "metrics": metrics, "overrides": variant.overrides,
                            "world_size": world_size}
        if self.on_run is not None:
            self.on_run(variant, metrics, cached)
        return metrics

    def _variant(self, s: Settings, seed: int | None = None) -> dict[str, str]:
        out = {**s.overrides(), **self.degree(self.world_size)}
        if seed is not None:
            out["seed"] = str(seed)
        return out

    def degree(self, ranks: int) -> dict[str, str]:
        """The overrides of a run on ``ranks`` ranks: as many processes, or ``processes`` emulating them."""
        return degree_overrides(ranks, self.processes or ranks)

    def walk(self) -> Outcome:
        rows: list[Row] = []
        baseline: Row | None = None
        branch = "train" if self.world_size < self.threshold else "tune"

        def done(status: str, finished: bool) -> Outcome:
            scored = [r for r in rows if r.metrics]
            best = None
            for r in scored:
                if best is None or compare(r.metrics, best.metrics, self.tolerance) > 0:
                    best = r
            return Outcome(rows, baseline, status, finished, best, self.runs, branch)

        try:
            if branch == "train":
                m = self.execute("iter-0", self._variant(self.initial), self.world_size)
                rows.append(Row(0, DEFAULTS_LABEL, m, self.initial, self.world_size, "iter-0"))
                return done(f"{self.world_size} rank(s) < {self.threshold}: trained with the GreScale defaults "
                            "(no tuning needed below the threshold)", True)
            if self.baseline_metrics is not None:
                base = dict(self.baseline_metrics)
            else:
                base = self.execute("baseline", self.degree(1), 1)
            baseline = Row("baseline", BASELINE_LABEL, base, None, 1, "baseline")

            current, it = self.initial, 0
            m = self.execute("iter-0", self._variant(current), self.world_size)
            reached = compare(m, base, self.tolerance) >= 0
            rows.append(Row(0, DEFAULTS_LABEL, m, current, self.world_size, "iter-0", reached))
            previous, action, tried = m, 0, set()
            while not reached and action < len(ACTIONS):
                key, label, step = ACTIONS[action]
                candidate = (step(current, self.steps, self.total_epochs, tried) if key == "change_optimizer"
                             else step(current, self.steps, self.total_epochs))
                if candidate is None:  # this action cannot go any further
                    action += 1
                    continue
                if key == "change_optimizer":
                    tried |= {current.optimizer, candidate.optimizer}
                it += 1
                m = self.execute(f"iter-{it}", self._variant(candidate), self.world_size)
                improved = compare(m, previous, self.tolerance) > 0
                reached = compare(m, base, self.tolerance) >= 0
                rows.append(Row(it, label, m, candidate, self.world_size, f"iter-{it}", reached, improved))
                if improved or not self.revert_worse:
                    current, previous = candidate, m
                if not improved:
                    action += 1
            if not reached:
                return done("every action tried: the baseline was not reached (best iteration shown)", True)
            it += 1
            mv = self.execute(f"iter-{it}", self._variant(current, self.seed + 1), self.world_size)
            confirmed = compare(mv, base, self.tolerance) >= 0
            rows.append(Row(it, VALIDATION_LABEL, mv, current, self.world_size, f"iter-{it}", confirmed))
            return done("baseline reached and confirmed by the validation run (seed + 1)" if confirmed else
                        "baseline reached, but the validation run (seed + 1) fell short of it", True)
        except BudgetExhausted:
            return done(f"run budget of {self.budget} exhausted; run again with a larger --budget to go on",
                        False)


def default_settings(total_epochs: int, hyperparameters: Hyperparameters | None = None,
                     grescale: GreScaleConfig | None = None) -> Settings:
    """The GreScale defaults for a run of ``total_epochs``: the hyperparameters' lr and optimizer and
    GreScale's stages, as their Configs declare them (or as given), the decay stage 3/7 after the warmup."""
    hp, g = hyperparameters or Hyperparameters(), grescale or GreScaleConfig()
    _, _, decay = grescale_phases(total_epochs, g.warmup_epochs, g.decay_epochs)
    return Settings(lr=hp.lr, optimizer=hp.optimizer, warmup_epochs=g.warmup_epochs,
                    decay_coefficient=g.decay_coefficient, decay_epochs=decay)


def settings_dict(s: Settings | None) -> dict:
    return asdict(s) if s is not None else {}
