"""Training figures: loss, its gap to the residual baseline and the pre-clip gradient norm
(paper Figs. 2 and 5)."""

from __future__ import annotations

from typing import Optional

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..view import ExperimentView, RunView, describe
from .style import (
    COLORS, Curve, Skip, aggregate, by_connection, draw_band, facet_grid, finish, hide, log_ticks,
    mark_state, new_figure, run_state, runs_in, seed_note, state_keys, step_axes,
)

# -- 4. loss and gradient norm -------------------------------------------------------------

METRIC_LABELS = {
    "loss": "training loss (nats/byte)", "gap": "loss - residual loss", "grad_norm": "grad norm (pre-clip)",
}


def fig_loss_and_grad(view: ExperimentView) -> list[tuple[str, Figure]]:
    if not any(r.metrics for r in view.plottable):
        raise Skip("no run has training metrics")
    grid = facet_grid(view)
    show_gap = "residual" in view.connections and len(view.connections) > 1
    metrics = ["loss", "gap", "grad_norm"] if show_gap else ["loss", "grad_norm"]
    # y is not shared: one diverged run's loss would flatten every other panel
    fig, axes = new_figure(len(grid) * len(metrics), len(grid[0]), (4.0, 2.3), sharex=True)
    for (r, j), settings in np.ndenumerate(np.array(grid, dtype=object)):
        runs = [] if settings is None else runs_in(view, settings, lambda run: bool(run.metrics))
        for m, metric in enumerate(metrics):
            ax = axes[r * len(metrics) + m, j]
            if runs:
                draw_metric_panel(ax, metric, runs)
            else:
                hide(ax, "" if settings is None else "no runs")
            if j == 0:
                ax.set_ylabel(METRIC_LABELS[metric], fontsize=8)
            if metric == "grad_norm" and runs:
                ax.set_yscale("log")
                log_ticks(ax)
        if settings is not None:
            axes[r * len(metrics), j].set_title(describe(settings), fontsize=9)
    step_axes(axes)
    states = {state[0] for r in view.plottable if r.metrics and (state := run_state(r))}
    keys = state_keys(states)
    finish(fig, view, "loss and gradient norm during training (paper Figs. 2 and 5)",
           [seed_note(view), "gap: against the residual run with the same settings and seed" if show_gap else ""],
           view.connections, keys)
    return [("loss_and_grad_norm", fig)]


def draw_metric_panel(ax: Axes, metric: str, runs: list[RunView]) -> None:
    if metric == "gap":
        if not any(r.connection == "residual" for r in runs):
            return hide(ax, "no residual run at these settings")
        ax.axhline(0.0, color=COLORS["residual"], linewidth=0.8)
    for conn, group in by_connection(runs):
        curves = [(run, metric_curve(run, metric, runs)) for run in group]
        present = [c for _, c in curves if c is not None and len(c[0])]
        if present:
            draw_band(ax, aggregate(present), conn, marker="")
        for run, curve in curves:
            if run.status == "diverged" and curve is not None:
                mark_divergence(ax, run, curve)
            elif curve is not None and metric != "grad_norm":  # a dead run's gradient is 0: off a log axis
                mark_dead(ax, run, curve)


def metric_curve(run: RunView, metric: str, runs: list[RunView]) -> Optional[Curve]:
    """(steps, values) of a metric; `gap` is loss minus the matching residual loss (same seed
    when there is one, else the mean of the residual seeds)."""
    if metric != "gap":
        return run.metric(metric)
    baselines = [r for r in runs if r.connection == "residual"]
    if run.connection == "residual" or not baselines:
        return None
    same_seed = [r for r in baselines if r.seed == run.seed]
    base = aggregate([r.metric("loss") for r in (same_seed or baselines)])
    steps, loss = run.metric("loss")
    common, mine, theirs = np.intersect1d(steps, base.x, return_indices=True)
    return common, loss[mine] - base.mean[theirs]


def mark_dead(ax: Axes, run: RunView, curve: Curve) -> None:
    """A dead run's marker where its gradient became exactly 0 for good (view.Stability)."""
    state = run_state(run)
    if state is None or state[0] != "dead":
        return
    steps, values = curve
    at = np.nonzero((steps >= state[1]) & np.isfinite(values))[0]
    if len(at):  # no text beside it: dead runs often die a few steps apart (the legend says it)
        mark_state(ax, run, float(steps[at[0]]), float(values[at[0]]))


def mark_divergence(ax: Axes, run: RunView, curve: Curve) -> None:
    finite = np.isfinite(curve[1])
    if not finite.any():
        return
    x, y = curve[0][finite][-1], curve[1][finite][-1]
    ax.plot([x], [y], marker="x", color=COLORS[run.connection], markersize=8, markeredgewidth=2, zorder=4)
    ax.annotate(f"diverged @ {run.summary.get('diverged_step')}", (x, y), textcoords="offset points",
                xytext=(7, -3), ha="left", va="top", fontsize=7, color=COLORS[run.connection])
