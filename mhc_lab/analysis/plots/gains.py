"""Gain figures: composite gain during training, peak gain against the swept settings, gain
by layer at the peak probe (paper Fig. 3), and the residual signal by layer."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
from matplotlib import ticker
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ...store import as_float
from ..view import DEPTH, ExperimentView, RunView, axis_name, describe, group_runs
from .style import (
    COLORS, DIRECTION_KEYS, DIRECTION_STYLE, GAIN_LABEL, LINESTYLES, MIXING, NAMES, Curve, Skip, aggregate,
    by_connection, draw_band, facet_grid, finish, fmt_count, fmt_tick, gain_axis, hide, mark_state,
    new_figure, overflow_key, representative_note, representative_runs, run_state, runs_in, seed_note,
    state_keys, state_note, step_axes, unique,
)

# -- 1. gain vs training step --------------------------------------------------------------


def headline_curve(run: RunView, direction: str) -> Curve:
    return run.probe_series(lambda p: p["headline"][f"max_gain_{direction}"])


def fig_gain_vs_step(view: ExperimentView) -> list[tuple[str, Figure]]:
    if not any(len(r.probes) > 1 for r in view.plottable):
        raise Skip("no run has more than one probe")
    grid = facet_grid(view)
    fig, axes = new_figure(len(grid), len(grid[0]), (4.0, 2.9), sharex=True, sharey=True)
    states = []
    for (i, j), settings in np.ndenumerate(np.array(grid, dtype=object)):
        if settings is None:
            hide(axes[i, j], "")
            continue
        runs = runs_in(view, settings, lambda r: bool(r.probes))
        states += draw_gain_panel(axes[i, j], runs)
        schedule_twin(axes[i, j], runs, label=j == len(grid[0]) - 1)
        axes[i, j].set_title(describe(settings), fontsize=9)
    far = []
    for (i, j), ax in np.ndenumerate(axes):
        far += gain_axis(ax, GAIN_LABEL if j == 0 else None, view.connections)
    step_axes(axes)
    keys = [*DIRECTION_KEYS, Line2D([], [], color=SCHEDULE_COLOR, linewidth=3, alpha=0.5,
                                    label="learning rate (right axis)")]
    finish(fig, view, "composite gain during training", [seed_note(view), *unique(far)],
           view.connections, [*keys, *state_keys(states), *overflow_key(axes.flat)])
    return [("gain_vs_step", fig)]


SCHEDULE_COLOR = "0.6"


def schedule_twin(ax: Axes, runs: list[RunView], label: bool) -> None:
    """The learning-rate schedule of the panel's runs, faint, on a twin y axis from 0: whether
    the gain's growth follows the learning rate can be read off one panel."""
    curves = [r.metric("lr") for r in runs if r.metrics]
    curves = [c for c in curves if len(c[0])]
    if not curves:
        return
    steps, lr = max(curves, key=lambda c: c[0][-1])  # the longest run's schedule
    twin = ax.twinx()
    twin.fill_between(steps, 0, lr, color=SCHEDULE_COLOR, alpha=0.18, linewidth=0, zorder=0)
    twin.plot(steps, lr, color=SCHEDULE_COLOR, linewidth=0.8, alpha=0.8)
    twin.set_ylim(0, float(np.nanmax(lr)) * 1.05 if np.isfinite(lr).any() else 1.0)
    twin.spines[["top"]].set_visible(False)
    twin.tick_params(labelsize=7, colors="0.45")
    twin.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    twin.yaxis.get_offset_text().set_fontsize(7)
    if label:
        twin.set_ylabel("learning rate", fontsize=8, color="0.45")
    else:
        twin.set_yticklabels([])
    ax.set_zorder(twin.get_zorder() + 1)  # the gain lines above the schedule
    ax.patch.set_visible(False)


def draw_gain_panel(ax: Axes, runs: list[RunView]) -> list[str]:
    """Headline gains per connection (mean and range over seeds); each diverged or dead run
    marked on its own curve. Returns the states marked."""
    if not runs:
        hide(ax)
        return []
    for conn, group in by_connection(runs):
        for direction, style in DIRECTION_STYLE.items():
            draw_band(ax, aggregate([headline_curve(r, direction) for r in group]), conn, style)
    return [state for run in runs if (state := mark_on_curve(ax, run, headline_curve(run, "fwd")))]


def mark_on_curve(ax: Axes, run: RunView, curve: Curve) -> Optional[str]:
    """A diverged run's marker at its last finite point; a dead run's where it died."""
    state = run_state(run)
    steps, values = curve
    finite = np.nonzero(np.isfinite(values))[0]
    if state is None or not len(finite):
        return None
    at = finite[-1] if state[0] == "diverged" else next((i for i in finite if steps[i] >= state[1]), finite[-1])
    return mark_state(ax, run, float(steps[at]), float(values[at]))


# -- 2. gain vs depth and scale ------------------------------------------------------------


WIDTH = "model.d_model"


@dataclass
class ScalePanel:
    """One x axis of the scaling figure: a swept setting, or the parameter count."""

    key: str  # a swept config key, or `n_params`
    covers: tuple[str, ...]  # the swept keys this x axis stands for
    label: str

    def x(self, run: RunView) -> Optional[float]:
        value = run.number("n_params") if self.key == "n_params" else run.setting(self.key)
        return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def scale_panels(view: ExperimentView) -> list[ScalePanel]:
    """Depth, parameter count (when width is swept) and every other numeric swept setting
    that is not just a function of those (e.g. heads changed together with width)."""
    panels = []
    if DEPTH in view.axes:
        panels.append(ScalePanel(DEPTH, (DEPTH,), f"{axis_name(DEPTH)}; layers = 2 x depth"))
    if WIDTH in view.axes:
        panels.append(ScalePanel("n_params", (DEPTH, WIDTH), "parameters"))
    for key in view.numeric_axes():
        if key not in (DEPTH, WIDTH) and not any(view.tied(key, p.covers) for p in panels):
            panels.append(ScalePanel(key, (key,), axis_name(key)))
    return panels


def fig_gain_vs_scale(view: ExperimentView) -> list[tuple[str, Figure]]:
    panels = scale_panels(view)
    if not panels:
        raise Skip("no numeric setting (depth, width, n, lr, ...) is swept")
    fig, axes = new_figure(1, len(panels), (4.4, 3.4), sharey=True)
    states = []
    for ax, panel in zip(axes[0], panels):
        states += draw_scale_panel(ax, view, panel)
    far = [note for j, ax in enumerate(axes[0])
           for note in gain_axis(ax, "peak " + GAIN_LABEL if j == 0 else None, view.connections)]
    lines = [Line2D([], [], color=COLORS[c], linewidth=2, marker=SCALE_MARKERS.get(c, "o"), markersize=SCALE_SIZES.get(c, 6.0) * 0.7,
                    markerfacecolor="none", label=NAMES[c]) for c in view.connections]
    finish(fig, view, "peak gain against the swept settings",
           [seed_note(view), "markers nest where connections coincide", *unique(far)], (),
           [*lines, *state_keys(states), *overflow_key(axes.flat)])
    return [("gain_vs_scale", fig)]


# Each connection its own hollow marker and size, so a line hidden under another (HC's gain of
# 1 under residual and mHC in a short sweep) still shows as a ring around or inside theirs.
SCALE_MARKERS = {"hc": "o", "mhc_lite": "^", "kromhc": "h", "mhc": "s", "ortho": "p", "residual": "D"}
SCALE_SIZES = {"hc": 11.0, "mhc_lite": 9.5, "kromhc": 8.5, "mhc": 7.0, "ortho": 6.0, "residual": 4.0}


def draw_scale_panel(ax: Axes, view: ExperimentView, panel: ScalePanel) -> list[str]:
    """Peak gain per run against one x; a line per connection and setting of the other axes,
    each point a hollow marker of its connection; diverged and dead runs marked. Returns the
    states marked."""
    others = [k for k in view.axes if k not in panel.covers and not view.tied(k, panel.covers)]
    runs = [r for r in view.plottable if panel.x(r) is not None]
    groups = group_runs(runs, others)
    combos = unique(tuple(key[1:]) for key in groups)
    for (conn, *values), group in groups.items():
        index = combos.index(tuple(values))
        band = aggregate([(np.array([panel.x(r)]), np.array([r.peak_gain])) for r in group])
        draw_band(ax, band, conn, LINESTYLES[index % len(LINESTYLES)], marker="")
        ax.plot(band.x, band.mean, linestyle="", marker=SCALE_MARKERS.get(conn, "o"), markersize=SCALE_SIZES.get(conn, 6.0),
                markerfacecolor="none", markeredgecolor=COLORS[conn], markeredgewidth=1.3, zorder=4)
    states = [state for r in runs if (state := mark_state(ax, r, panel.x(r), r.peak_gain))]
    if len(combos) > 1:
        ax.legend(handles=[Line2D([], [], color="0.25", linestyle=LINESTYLES[i % len(LINESTYLES)],
                                  label=describe({k: v for k, v in zip(others, combo) if v is not None}) or "-")
                           for i, combo in enumerate(combos)], fontsize=7, frameon=False)
    ax.set_xlabel(panel.label, fontsize=8.5)
    x_axis(ax, sorted({panel.x(r) for r in runs}), counts=panel.key == "n_params")
    return states


def x_axis(ax: Axes, values: list[float], counts: bool = False) -> None:
    """Log x for parameter counts and for positive settings spanning 8x or more (depth 3..48,
    lr 1e-3..3e-2), ticks at the swept values; linear otherwise (e.g. t_max from 0)."""
    if counts:
        ax.set_xscale("log")
        for set_formatter in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
            set_formatter(ticker.FuncFormatter(fmt_count))
        ax.tick_params(axis="x", which="both", labelsize=7.5)
        return
    if values and values[0] > 0 and values[-1] / values[0] >= 8:
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.xaxis.set_major_locator(ticker.FixedLocator(values))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(fmt_tick))


# -- 3. gain by layer ----------------------------------------------------------------------


def fig_gain_by_layer(view: ExperimentView) -> list[tuple[str, Figure]]:
    chosen = representative_runs(view)
    if not chosen:
        raise Skip("no HC or mHC run with probes")
    kinds = (("single", "single-layer gain of H_l"), ("composite", "composite gain (P_l fwd, S_l bwd)"))
    fig, axes = new_figure(2, len(chosen), (4.4, 2.9), sharey="row", sharex="col")
    for j, (conn, run) in enumerate(chosen.items()):
        probe = run.peak_probe()
        for i, (kind, _) in enumerate(kinds):
            for direction, style in DIRECTION_STYLE.items():
                values = [as_float(v) for v in probe[kind][direction]["amax"]["mean"]]
                draw_band(axes[i, j], aggregate([(np.arange(len(values)), np.array(values))]), conn, style)
        axes[0, j].set_title(f"{NAMES[conn]}: {run.run_id}\nprobe at step {probe['step']}{state_note(run)}",
                             fontsize=8.5, color=COLORS[conn])
        axes[1, j].set_xlabel("layer index l (two layers per block)", fontsize=8.5)
        axes[1, j].xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    far = []
    for (i, j), ax in np.ndenumerate(axes):
        far += gain_axis(ax, kinds[i][1] if j == 0 else None, chosen if i == 1 else ())
    finish(fig, view, "gain by layer at the peak probe (paper Fig. 3)",
           [representative_note(view, chosen), *unique(far)],
           chosen, [*DIRECTION_KEYS, *overflow_key(axes.flat)])
    return [("gain_by_layer", fig)]


# -- 3b. the residual signal by layer ------------------------------------------------------


def fig_signal_by_layer(view: ExperimentView) -> list[tuple[str, Figure]]:
    chosen = representative_runs(view, (*MIXING, "residual"))
    measured = {c: [p for p in r.probes if "stream_rms" in p] for c, r in chosen.items()}
    measured = {c: probes for c, probes in measured.items() if probes}
    if not measured:
        raise Skip("no probe recorded the stream RMS (results written before it was measured)")
    fig, axes = new_figure(1, 1, (6.4, 3.6))
    ax = axes[0, 0]
    for conn, probes in measured.items():
        for probe, style in ((probes[0], ":"), (probes[-1], "-")):
            rms = np.array([as_float(v) for v in probe["stream_rms"]])
            draw_band(ax, aggregate([(np.arange(len(rms)), rms / rms[0])]), conn, style, marker="")
    ax.set_xlabel("layer index l (the state entering layer l; the last point leaves the last layer)", fontsize=8.5)
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    gain_axis(ax, "RMS(x_l) / RMS(x_0)")
    first = sorted({probes[0]["step"] for probes in measured.values()})
    last = sorted({probes[-1]["step"] for probes in measured.values()})
    mixing = {c: r for c, r in chosen.items() if c in measured and c != "residual"}
    note = representative_note(view, mixing) if mixing else "the residual run"
    if mixing and "residual" in measured:
        note += ", and the residual at its settings and seed"
    note += "".join(f"; {NAMES[c]}{state_note(r)}" for c, r in chosen.items() if c in measured and state_note(r))
    finish(fig, view, "the residual signal by layer",
           [note, f"solid: step {'/'.join(map(str, last))}; dotted: step {'/'.join(map(str, first))}"],
           measured)
    return [("signal_by_layer", fig)]
