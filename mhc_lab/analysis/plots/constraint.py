"""Constraint-health figure: how far each doubly-stochastic connection's H_res is from its
constraint, layer by layer, at the last probe (probe/constraint.py records the numbers)."""

from __future__ import annotations

import numpy as np
from matplotlib import ticker
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ...probe.constraint import SLOW_SPREAD
from ...store import as_float
from ..view import ExperimentView, RunView, describe
from .style import (
    Skip, aggregate, by_connection, draw_band, facet_grid, finish, hide, log_ticks, new_figure, runs_in,
    seed_note, style_keys,
)

CONSTRAINED = ("mhc", "mhc_tol", "mhc_lite", "kromhc", "ortho")  # H_res meant to be doubly stochastic
SINKHORN = ("mhc", "mhc_tol")  # whose logit spread slows Sinkhorn-Knopp
FLOOR = 1e-9  # column errors below this (float32 rounding is ~1e-7) are drawn at it
ROWS = (
    ("col_sum_err", "worst |column sum - 1|"),
    ("logit_spread_max", "H_res logit spread\n(max - min, worst token)"),
)


def _last_constraint(run: RunView) -> dict:
    """The `hres` statistics of the run's last probe that recorded the column error."""
    for probe in reversed(run.probes):
        if "col_sum_err" in probe.get("hres", {}):
            return probe["hres"]
    return {}


def fig_constraint_health(view: ExperimentView) -> list[tuple[str, Figure]]:
    runs = [r for r in view.plottable if r.connection in CONSTRAINED and _last_constraint(r)]
    if not runs:
        raise Skip("no mHC-family run (mhc, mhc_lite, kromhc, ortho) recorded the column error")
    grid = facet_grid(view)
    fig, axes = new_figure(len(grid) * len(ROWS), len(grid[0]), (4.0, 2.4), sharex=True)
    for (r, j), settings in np.ndenumerate(np.array(grid, dtype=object)):
        chosen = [] if settings is None else runs_in(view, settings, lambda run: run in runs)
        for m, (key, label) in enumerate(ROWS):
            ax = axes[r * len(ROWS) + m, j]
            if chosen:
                draw_constraint_panel(ax, key, chosen)
            else:
                hide(ax, "" if settings is None else "no mHC-family runs")
            if j == 0:
                ax.set_ylabel(label, fontsize=8)
        if settings is not None:
            axes[r * len(ROWS), j].set_title(describe(settings), fontsize=9)
    for ax in axes[-1, :]:
        ax.set_xlabel("layer index l", fontsize=8.5)
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    shown = [c for c in CONSTRAINED if any(r.connection == c for r in runs)]
    keys = (style_keys((":", f"logit spread {SLOW_SPREAD:g}: finite Sinkhorn converges slowly above"))
            if any(r.connection in SINKHORN for r in runs) else [])
    finish(fig, view, "constraint health at the last probe",
           [seed_note(view), f"column errors below {FLOOR:g} drawn at {FLOOR:g} (float32 rounding is ~1e-7)"],
           shown, keys)
    return [("constraint_health", fig)]


def draw_constraint_panel(ax: Axes, key: str, runs: list[RunView]) -> None:
    """One line per connection (band over seeds) of a per-layer statistic of the last probe."""
    drawn = False
    for conn, group in by_connection(runs):
        curves = []
        for run in group:
            values = _last_constraint(run).get(key)
            if values is None or any(v is None for v in values):
                continue
            y = np.array([as_float(v) for v in values])
            curves.append((np.arange(len(y)), np.maximum(y, FLOOR) if key == "col_sum_err" else y))
        if curves:
            draw_band(ax, aggregate(curves), conn, marker="")
            drawn = True
    if not drawn:
        return hide(ax, "not recorded")
    if key == "col_sum_err":
        ax.set_yscale("log")
        log_ticks(ax)
    else:
        if any(r.connection in SINKHORN for r in runs):  # the threshold is Sinkhorn's
            ax.axhline(SLOW_SPREAD, color="0.4", linestyle=":", linewidth=1.0)
        ax.set_ylim(bottom=0)
    ax.tick_params(labelsize=8)
