"""The guideline's iteration table, as thesis Tables 6.1-6.10: CSV, text and a plot."""

from __future__ import annotations

import csv
import io
import math
import textwrap
from pathlib import Path

from ..core.files import atomic_write
from ..core.metrics import GUIDELINE_PRIORITY, SEGEVAL
from ..core.text import text_table
from .guideline import Outcome, Row, settings_dict
from .lr_plot import save_figure

HEADERS = dict(zip(SEGEVAL, ("Dice", "PA", "MA", "mean.IoU", "f.w.IoU"), strict=True))
SETTING_COLUMNS = ("lr", "optimizer", "warmup_epochs", "decay_coefficient", "decay_epochs")
COLUMNS = ("iteration", "action", *SEGEVAL, "ranks", *SETTING_COLUMNS, "reached_baseline", "improved", "run")


def _rows(outcome: Outcome) -> list[Row]:
    return [*outcome.rows, *([outcome.baseline] if outcome.baseline else [])]


def write_csv(outcome: Outcome, path: Path) -> Path:
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, COLUMNS, restval="")
    w.writeheader()
    for r in _rows(outcome):
        w.writerow({"iteration": r.iteration, "action": r.action,
                    **{m: r.metrics.get(m, "") for m in SEGEVAL}, "ranks": r.world_size,
                    **settings_dict(r.settings),
                    "reached_baseline": "" if r.reached is None else r.reached,
                    "improved": "" if r.improved is None else r.improved, "run": r.run})
    return atomic_write(path, text.getvalue())


def _pct(v) -> str:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return ""
    return f"{100 * v:.2f}%" if math.isfinite(v) else "nan"


def format_table(outcome: Outcome) -> str:
    """The thesis' table layout: Iteration, Action, Dice, PA, MA, mean.IoU, f.w.IoU (+ the settings)."""
    head = ["Iteration", "Action", *HEADERS.values(), "lr", "opt", "warmup", "decay coef", "decay ep"]
    lines = []
    for r in _rows(outcome):
        s = settings_dict(r.settings)
        mark = " *" if r.reached else ""
        lines.append([str(r.iteration) if r is not outcome.baseline else "", r.action + mark,
                      *[_pct(r.metrics.get(m)) for m in SEGEVAL],
                      f"{s['lr']:.3g}" if s else "", s.get("optimizer", ""), str(s.get("warmup_epochs", "")),
                      f"{s['decay_coefficient']:g}" if s else "", str(s.get("decay_epochs", ""))])
    out = [text_table(head, lines, left=2, rule=True)]
    if outcome.baseline is not None:
        out.append("* reached the baseline (Dice, then MA, then mean IoU)")
    return "\n".join(out)


def plot(outcome: Outcome, path: Path) -> Path | None:
    rows = [r for r in outcome.rows if r.metrics]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(rows) + 3), 4.5))
    xs = list(range(len(rows)))
    for name, color in zip(GUIDELINE_PRIORITY, ("C0", "C1", "C2"), strict=True):
        ax.plot(xs, [100 * float(r.metrics.get(name, math.nan)) for r in rows], "o-", color=color,
                label=HEADERS[name])
        if outcome.baseline is not None and name in outcome.baseline.metrics:
            ax.axhline(100 * float(outcome.baseline.metrics[name]), color=color, ls="--", lw=1,
                       label=f"baseline {HEADERS[name]}")
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{r.iteration}\n" + textwrap.fill(r.action.replace("the ", "").replace(" value", ""), 18)
                        for r in rows], fontsize=7)
    ax.set_ylabel("%")
    ax.set_title(f"GreScale guideline on {rows[0].world_size} rank(s): {outcome.status}", fontsize=8)
    ax.legend(fontsize=7)
    return save_figure(fig, path)
