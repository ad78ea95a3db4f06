"""Training figures: loss, its gap to the residual baseline and the pre-clip gradient norm
(paper Figs. 2 and 5), over a strip with the learning-rate schedule, so a surge can be read
against the schedule. Long curves get a moving average with the raw curve kept faint."""

from __future__ import annotations

from typing import Optional

import numpy as np
from matplotlib import ticker
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
    "lr": "learning rate",
}
SMOOTH_FROM = 500  # logged steps from which `auto` smoothing draws a moving average
SMOOTHED = ("loss", "gap", "grad_norm")


def smoothing_window(view: ExperimentView, smooth: Optional[int]) -> int:
    """The moving-average window in logged steps: `smooth` if given (0 or 1: none), else
    automatic: none below SMOOTH_FROM logged steps, else a fiftieth of the longest run."""
    if smooth is not None:
        return max(int(smooth), 1)
    longest = max((len(r.metrics) for r in view.plottable), default=0)
    return 1 if longest < SMOOTH_FROM else max(longest // 50, 2)


def moving_average(curve: Curve, window: int) -> Curve:
    """Trailing mean over `window` points of the finite values (the first points average what
    there is so far); non-finite points stay where they are."""
    x, y = curve
    if window <= 1 or len(y) == 0:
        return curve
    finite = np.isfinite(y)
    sums = np.cumsum(np.where(finite, y, 0.0))
    counts = np.cumsum(finite)
    lo = np.arange(len(y)) - window
    prev_sums = np.where(lo >= 0, sums[np.maximum(lo, 0)], 0.0)
    prev_counts = np.where(lo >= 0, counts[np.maximum(lo, 0)], 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        smooth = (sums - prev_sums) / (counts - prev_counts)
    return x, np.where(finite, smooth, y)


def fig_loss_and_grad(view: ExperimentView, smooth: Optional[int] = None) -> list[tuple[str, Figure]]:
    if not any(r.metrics for r in view.plottable):
        raise Skip("no run has training metrics")
    grid = facet_grid(view)
    show_gap = "residual" in view.connections and len(view.connections) > 1
    metrics = ["loss", "gap", "grad_norm", "lr"] if show_gap else ["loss", "grad_norm", "lr"]
    window = smoothing_window(view, smooth)
    # y is not shared: one diverged run's loss would flatten every other panel
    fig, axes = new_figure(len(grid) * len(metrics), len(grid[0]), (4.0, 2.3), sharex=True,
                           gridspec_kw={"height_ratios": [0.45 if m == "lr" else 1.0 for m in metrics] * len(grid)})
    for (r, j), settings in np.ndenumerate(np.array(grid, dtype=object)):
        runs = [] if settings is None else runs_in(view, settings, lambda run: bool(run.metrics))
        for m, metric in enumerate(metrics):
            ax = axes[r * len(metrics) + m, j]
            if runs and metric == "lr":
                draw_schedule(ax, runs)
            elif runs:
                draw_metric_panel(ax, metric, runs, window if metric in SMOOTHED else 1)
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
    smoothing = (f"lines: moving average over {window} logged steps, the raw curves faint"
                 if window > 1 else "")
    finish(fig, view, "loss and gradient norm during training (paper Figs. 2 and 5)",
           [seed_note(view), "gap: against the residual run with the same settings and seed" if show_gap else "",
            smoothing, "bottom strip: the learning-rate schedule"],
           view.connections, keys)
    return [("loss_and_grad_norm", fig)]


def draw_schedule(ax: Axes, runs: list[RunView]) -> None:
    """The learning rate the runs logged, one grey line per distinct schedule."""
    drawn = set()
    for run in runs:
        steps, lr = run.metric("lr")
        key = (tuple(steps[:: max(len(steps) // 50, 1)]), tuple(lr[:: max(len(lr) // 50, 1)]))
        if len(steps) and key not in drawn:
            drawn.add(key)
            ax.plot(steps, lr, color="0.45", linewidth=1.0)
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_locator(ticker.MaxNLocator(3))
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax.yaxis.get_offset_text().set_fontsize(7)


def draw_metric_panel(ax: Axes, metric: str, runs: list[RunView], window: int = 1) -> None:
    if metric == "gap":
        if not any(r.connection == "residual" for r in runs):
            return hide(ax, "no residual run at these settings")
        ax.axhline(0.0, color=COLORS["residual"], linewidth=0.8)
    for conn, group in by_connection(runs):
        curves = [(run, metric_curve(run, metric, runs)) for run in group]
        present = [c for _, c in curves if c is not None and len(c[0])]
        if present and window > 1:
            raw = aggregate(present)
            ax.plot(raw.x, raw.mean, color=COLORS[conn], linewidth=0.5, alpha=0.25, zorder=1)
            draw_band(ax, aggregate([moving_average(c, window) for c in present]), conn, marker="")
        elif present:
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
