"""The mHC paper's figures, drawn from any results folder (reads the store, never trains).

`plot_experiment(view, out_dir)` writes one file per figure whose data the sweep has:

    gain_vs_step              composite gain at every probe, per connection, faceted by the sweep
    gain_vs_scale             peak composite gain per run against depth, parameter count (when
                              width is swept) and any other numeric swept setting (n, lr, t_max)
    gain_by_layer             single-layer and composite gain per layer at the peak (paper Fig. 3)
    loss_and_grad_norm        training loss, gap to the residual baseline, pre-clip gradient norm
                              (paper Figs. 2 and 5)
    mixing_matrices           token-mean H_res: first and last layer, composite (paper Fig. 8)
    sweep_heatmap_<y>_x_<x>   peak gain over two crossed numeric swept settings, per connection

"Gain" is the paper's Amax gain magnitude (gain.py, DESIGN.md section 3), token mean; a probe's
headline is its largest composite gain over layers. Where several seeds share a setting, lines
are their mean and the shaded band their min-max range. Non-finite gains (overflow, stored as
"inf") are left out of lines and counted on the panel.

Figures are built on `matplotlib.figure.Figure` directly (Agg canvas: no pyplot state, no
display). Colours are Okabe-Ito (colour-blind safe) and the same in every figure.
"""

from __future__ import annotations

import itertools
import math
import textwrap
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import matplotlib
import numpy as np
from matplotlib import colors as mcolors
from matplotlib import ticker
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .results_view import (
    DEPTH, ExperimentView, RunView, axis_name, describe, format_value, group_runs, matches, short_name,
)
from .store import as_float

FORMATS = ("png", "svg", "pdf")
COLORS = {"residual": "#555555", "hc": "#D55E00", "mhc": "#0072B2"}  # Okabe-Ito grey, vermillion, blue
NAMES = {"residual": "residual", "hc": "HC", "mhc": "mHC"}
LINE_WIDTH = {"residual": 1.1, "hc": 1.8, "mhc": 1.8}  # residual thin and on top: it often hides under mHC's 1
DIRECTION_STYLE = {"fwd": "-", "bwd": "--"}
# The mHC paper's composite gains (27B model, 60 layers; DESIGN.md section 3).
PAPER_GAIN = {"residual": 1.0, "hc": 3000.0, "mhc": 1.6}
PAPER_GAIN_TEXT = {"hc": "paper HC ≈ 3000", "mhc": "paper mHC ≤ 1.6"}
REF_REACH = 30.0  # draw a paper line when it is within this factor above the data
GAIN_LABEL = "composite gain (Amax, token mean)"
STEP_LABEL = "training step"
DPI = 150
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
LINESTYLES = ("-", "-.", (0, (5, 1.5)), (0, (3, 1, 1, 1, 1, 1)))
TITLES = {
    "gain_vs_step": "Gain during training",
    "gain_vs_scale": "Peak gain against depth, scale and the other swept settings",
    "gain_by_layer": "Gain by layer (paper Fig. 3)",
    "loss_and_grad_norm": "Loss and gradient norm (paper Figs. 2 and 5)",
    "mixing_matrices": "Mixing matrices (paper Fig. 8)",
    "signal_by_layer": "Residual signal by layer",
    "sweep_heatmap": "Sweep heatmap",
}
CAPTIONS = {
    "gain_vs_step": "Composite gain at each probe (largest over layers), forward solid and "
    "backward dashed, one line per connection; dotted lines are the paper's values.",
    "gain_vs_scale": "Peak composite gain of each run (forward or backward, over layers and "
    "probes) against depth, parameter count and the other numeric swept settings: the scaling "
    "picture.",
    "gain_by_layer": "Single-layer and composite gain against layer index at the run's peak "
    "probe, HC beside mHC (the paper's Fig. 3).",
    "loss_and_grad_norm": "Training loss, its gap to the residual baseline with the same "
    "settings and seed, and the gradient norm before clipping (the paper's Figs. 2 and 5); "
    "x marks where a diverged run stopped.",
    "mixing_matrices": "H_res averaged over the probe tokens at the peak probe: first layer, "
    "last layer and the composite product H_{L-1}...H_0 (per token, float64, then averaged), "
    "with row and column sums (the paper's Fig. 8).",
    "signal_by_layer": "RMS of the hidden state entering each layer (all streams), relative to "
    "the embedding's, on the probe sequence after the last step (solid) and at step 0 (dotted): "
    "how far the residual signal itself grew, which the gain metric bounds through H_res.",
    "sweep_heatmap": "Peak composite gain over two swept settings (mean over seeds), one panel "
    "per connection.",
}

Curve = tuple[np.ndarray, np.ndarray]  # (x, y)


class Skip(Exception):
    """A figure the sweep has no data for; the message says why."""


@dataclass
class PlotResult:
    """What `plot_experiment` did: the figure files (written or kept) and the figures skipped."""

    written: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _kind(stem: str) -> str:
    return "sweep_heatmap" if stem.startswith("sweep_heatmap") else stem


def caption(stem: str) -> str:
    """The one-line explanation of a figure file (for the report)."""
    return CAPTIONS.get(_kind(stem), "")


def figure_title(stem: str) -> str:
    """A heading for a figure file: `sweep_heatmap_n_streams_x_depth` -> `Sweep heatmap: n_streams x depth`."""
    title = TITLES.get(_kind(stem), stem)
    if _kind(stem) == "sweep_heatmap" and stem != "sweep_heatmap":
        title += ": " + stem.removeprefix("sweep_heatmap_").replace("_x_", " x ")
    return title


# -- numbers -------------------------------------------------------------------------------


@dataclass
class Band:
    """Curves aggregated over x: mean, min and max of the finite values at each x."""

    x: np.ndarray
    mean: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    curves: int
    nonfinite: int


def aggregate(curves: Sequence[Curve]) -> Band:
    """Align curves on the union of their x values and take mean / min / max per x."""
    xs = np.unique(np.concatenate([np.asarray(x, dtype=float) for x, _ in curves]))
    table = np.full((len(curves), len(xs)), np.nan)
    for row, (x, y) in enumerate(curves):
        table[row, np.searchsorted(xs, x)] = y
    nonfinite = int(np.isinf(table).sum())
    table[~np.isfinite(table)] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column is a gap
        return Band(xs, np.nanmean(table, 0), np.nanmin(table, 0), np.nanmax(table, 0), len(curves), nonfinite)


def composite_product(hres: np.ndarray) -> np.ndarray:
    """H_{L-1} @ ... @ H_0 per token in float64: (L, T, n, n) -> (T, n, n); overflow -> inf."""
    h = np.asarray(hres, dtype=np.float64)
    product = h[0]  # (T, n, n)
    with np.errstate(over="ignore", invalid="ignore"):
        for layer in h[1:]:
            product = layer @ product  # (T, n, n) @ (T, n, n), per token
    return product


def token_mean(matrices: np.ndarray) -> np.ndarray:
    """(T, n, n) -> (n, n), quiet about overflowed entries."""
    with np.errstate(over="ignore", invalid="ignore"):
        return matrices.mean(axis=0)


def fmt_number(value: float) -> str:
    """Compact text for cells and labels: 0.948, 1, 12.3, 257, 2.6e3, 1.2e5, inf."""
    if not math.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) >= 1e3 or abs(value) < 1e-3):
        mantissa, exponent = f"{value:.1e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    if abs(value) >= 10:
        return f"{value:.3g}"
    return f"{value:.3f}".rstrip("0").rstrip(".")


def fmt_count(value: float, _pos=None) -> str:
    """Parameter-count tick text: 30k, 1.2M."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def fmt_tick(value: float, _pos=None) -> str:
    """Log-axis tick text: 0.8, 1, 1.2, 10, 1000, 1e+04."""
    return f"{value:.4g}"


# -- figure scaffolding --------------------------------------------------------------------


def new_figure(rows: int, cols: int, panel: tuple[float, float], **kwargs) -> tuple[Figure, np.ndarray]:
    """A figure with a rows x cols grid of axes (always a 2-D array), constrained layout."""
    fig = Figure(figsize=(max(panel[0] * cols + 0.8, 7.0), panel[1] * rows + 1.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, **kwargs)
    for ax in axes.flat:
        ax.grid(True, which="major", alpha=0.3, linewidth=0.6)
        ax.spines[["top", "right"]].set_visible(False)
        ax.tick_params(labelsize=8)
    return fig, axes


def finish(fig: Figure, view: ExperimentView, what: str, notes: Iterable[str] = (),
           connections: Iterable[str] = (), keys: Sequence[Line2D] = ()) -> None:
    """Title, and under the panels one legend (a colour per connection, then `keys`) headed
    by what the figure holds fixed and any notes."""
    fig.suptitle(f"{view.name}: {what}", fontsize=11, fontweight="bold")
    fixed = describe(view.fixed())
    detail = "; ".join(s for s in (f"fixed: {fixed}" if fixed else "", *notes) if s)
    handles = [Line2D([], [], color=COLORS[c], linewidth=2, label=NAMES[c]) for c in connections]
    handles += list(keys)
    width = int(fig.get_figwidth() * 15)
    columns = max(1, min(len(handles), 6, int(fig.get_figwidth() / 1.7)))
    legend = fig.legend(handles=handles, loc="outside lower center", ncols=columns,
                        fontsize=8, frameon=False, title=textwrap.fill(detail, width) or None, title_fontsize=7.5)
    legend.get_title().set_color("0.3")


def seed_note(view: ExperimentView) -> str:
    seeds = len(view.seeds)
    return f"line = mean over {seeds} seeds, band = min-max" if seeds > 1 else ""


def style_keys(*items: tuple[object, str], marker: str = "") -> list[Line2D]:
    """Legend entries for line styles: ('-', 'forward') -> a dark solid line."""
    return [Line2D([], [], color="0.25", linestyle=ls, marker=marker, label=text) for ls, text in items]


DIRECTION_KEYS = style_keys(("-", "forward (row sums)"), ("--", "backward (column sums)"), (":", "paper's value"))


def hide(ax: Axes, text: str = "no runs") -> None:
    """An empty panel that says why (its axes may be shared, so ticks are left alone)."""
    ax.axis("off")
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.5")


def draw_band(ax: Axes, band: Band, conn: str, linestyle: object = "-", marker: Optional[str] = None) -> None:
    """The mean line of a Band in the connection's colour; its min-max range shaded."""
    marker = ("o" if len(band.x) <= 12 else "") if marker is None else marker
    color = COLORS[conn]
    zorder = 3 if conn == "residual" else 2
    ax.plot(band.x, band.mean, color=color, linestyle=linestyle, marker=marker, markersize=3.5,
            linewidth=LINE_WIDTH[conn], zorder=zorder)
    if band.curves > 1:
        ax.fill_between(band.x, band.lo, band.hi, color=color, alpha=0.15, linewidth=0, zorder=1)
    if band.nonfinite:
        ax.text(0.98, 0.02, f"{band.nonfinite} non-finite value(s) not drawn", transform=ax.transAxes,
                fontsize=7, color="0.3", ha="right", va="bottom")


def gain_axis(ax: Axes, label: Optional[str] = None, refs: Iterable[str] = ()) -> list[str]:
    """Log scale with the paper's values for the `refs` connections; call after drawing
    every panel that shares this axis. Returns notes on paper values far above the data."""
    ax.set_yscale("log")
    far = paper_lines(ax, refs)
    log_ticks(ax)
    if label:
        ax.set_ylabel(label, fontsize=8.5)
    return far


def log_ticks(ax: Axes) -> None:
    """Plain-number ticks on a log y axis; linear tick spacing when it spans under a decade."""
    lo, hi = ax.get_ylim()
    if hi / max(lo, 1e-300) < 10:
        ax.yaxis.set_major_locator(ticker.MaxNLocator(5, steps=[1, 2, 5, 10]))
        ax.yaxis.set_minor_locator(ticker.NullLocator())
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(fmt_tick))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def paper_lines(ax: Axes, connections: Iterable[str]) -> list[str]:
    """Dotted lines at the paper's gains near the data; notes for the ones far above it."""
    lo, hi = ax.get_ylim()
    far = []
    for conn in connections:
        if conn not in PAPER_GAIN_TEXT:
            continue
        ref = PAPER_GAIN[conn]
        if ref > hi * REF_REACH:
            far.append(f"{PAPER_GAIN_TEXT[conn]} is far above the plotted range")
            continue
        ax.axhline(ref, color=COLORS[conn], linestyle=":", linewidth=1.2)
        ax.annotate(PAPER_GAIN_TEXT[conn], (1.0, ref), xycoords=("axes fraction", "data"),
                    ha="right", va="bottom", fontsize=7, color=COLORS[conn])
        lo, hi = min(lo, ref / 1.1), max(hi, ref * 1.3)
    if (lo, hi) != ax.get_ylim():
        lo /= (hi / lo) ** 0.04  # keep a margin under data that sits at the old lower limit
    ax.set_ylim(lo, hi)
    return far


def step_axes(axes: np.ndarray) -> None:
    """Integer training-step ticks, labelled on the bottom row."""
    for ax in axes.flat:
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    for ax in axes[-1, :]:
        ax.set_xlabel(STEP_LABEL, fontsize=8.5)


def unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


# -- facets --------------------------------------------------------------------------------


Grid = list[list[Optional[dict]]]


def facet_grid(view: ExperimentView, wrap: int = 3) -> Grid:
    """Panels as rows of settings: a column per depth and a row per combination of the other
    swept settings; without a depth sweep the combinations wrap `wrap` to a row. None marks
    an unused cell."""
    row_keys = [k for k in view.axes if k != DEPTH]
    combos = view.facets(row_keys) if row_keys else [{}]
    if DEPTH in view.axes:
        return [[{**combo, DEPTH: depth} for depth in view.axes[DEPTH]] for combo in combos]
    width = min(wrap, len(combos))
    padded = combos + [None] * (-len(combos) % width)
    return [padded[i:i + width] for i in range(0, len(padded), width)]


def runs_in(view: ExperimentView, settings: dict, need: Callable[[RunView], bool]) -> list[RunView]:
    return [r for r in view.plottable if matches(r, settings) and need(r)]


def by_connection(runs: list[RunView]) -> Iterable[tuple[str, list[RunView]]]:
    """(connection, its runs) in the fixed connection order; seeds end up in one group."""
    for (conn,), group in group_runs(runs, []).items():
        yield conn, group


# -- 1. gain vs training step --------------------------------------------------------------


def headline_curve(run: RunView, direction: str) -> Curve:
    return run.probe_series(lambda p: p["headline"][f"max_gain_{direction}"])


def fig_gain_vs_step(view: ExperimentView) -> list[tuple[str, Figure]]:
    if not any(len(r.probes) > 1 for r in view.plottable):
        raise Skip("no run has more than one probe")
    grid = facet_grid(view)
    fig, axes = new_figure(len(grid), len(grid[0]), (4.0, 2.9), sharex=True, sharey=True)
    for (i, j), settings in np.ndenumerate(np.array(grid, dtype=object)):
        if settings is None:
            hide(axes[i, j], "")
            continue
        draw_gain_panel(axes[i, j], runs_in(view, settings, lambda r: bool(r.probes)))
        axes[i, j].set_title(describe(settings), fontsize=9)
    far = []
    for (i, j), ax in np.ndenumerate(axes):
        far += gain_axis(ax, GAIN_LABEL if j == 0 else None, view.connections)
    step_axes(axes)
    finish(fig, view, "composite gain during training", [seed_note(view), *unique(far)],
           view.connections, DIRECTION_KEYS)
    return [("gain_vs_step", fig)]


def draw_gain_panel(ax: Axes, runs: list[RunView]) -> None:
    if not runs:
        return hide(ax)
    for conn, group in by_connection(runs):
        for direction, style in DIRECTION_STYLE.items():
            draw_band(ax, aggregate([headline_curve(r, direction) for r in group]), conn, style)


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
    for ax, panel in zip(axes[0], panels):
        draw_scale_panel(ax, view, panel)
    far = [note for j, ax in enumerate(axes[0])
           for note in gain_axis(ax, "peak " + GAIN_LABEL if j == 0 else None, view.connections)]
    finish(fig, view, "peak gain against the swept settings", [seed_note(view), *unique(far)], view.connections)
    return [("gain_vs_scale", fig)]


def draw_scale_panel(ax: Axes, view: ExperimentView, panel: ScalePanel) -> None:
    """Peak gain per run against one x; a line per connection and setting of the other axes."""
    others = [k for k in view.axes if k not in panel.covers and not view.tied(k, panel.covers)]
    runs = [r for r in view.plottable if panel.x(r) is not None]
    groups = group_runs(runs, others)
    combos = unique(tuple(key[1:]) for key in groups)
    for (conn, *values), group in groups.items():
        index = combos.index(tuple(values))
        band = aggregate([(np.array([panel.x(r)]), np.array([r.peak_gain])) for r in group])
        draw_band(ax, band, conn, LINESTYLES[index % len(LINESTYLES)], MARKERS[index % len(MARKERS)])
    if len(combos) > 1:
        ax.legend(handles=[Line2D([], [], color="0.25", linestyle=LINESTYLES[i % len(LINESTYLES)],
                                  marker=MARKERS[i % len(MARKERS)], markersize=4,
                                  label=describe({k: v for k, v in zip(others, combo) if v is not None}) or "-")
                           for i, combo in enumerate(combos)], fontsize=7, frameon=False)
    ax.set_xlabel(panel.label, fontsize=8.5)
    x_axis(ax, sorted({panel.x(r) for r in runs}), counts=panel.key == "n_params")


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


# -- the runs shown in the per-run figures -------------------------------------------------


def representative_runs(view: ExperimentView, connections: Sequence[str] = ("hc", "mhc")) -> dict[str, RunView]:
    """The run with the largest peak gain of the first connection present, and the runs of
    the other connections at the same settings and seed (else their own largest)."""
    chosen: dict[str, RunView] = {}
    anchor: Optional[RunView] = None
    for conn in connections:
        pool = [r for r in view.plottable if r.connection == conn and r.probes]
        if anchor is not None:
            pool = [r for r in pool if r.seed == anchor.seed and _same_settings(view, r, anchor)] or pool
        if pool:
            chosen[conn] = max(pool, key=lambda r: -math.inf if math.isnan(r.peak_gain) else r.peak_gain)
            anchor = anchor or chosen[conn]
    return chosen


def _same_settings(view: ExperimentView, a: RunView, b: RunView) -> bool:
    return all(a.setting(k) is None or b.setting(k) is None or a.setting(k) == b.setting(k) for k in view.axes)


def is_pair(view: ExperimentView, chosen: dict[str, RunView]) -> bool:
    """Whether the chosen HC and mHC runs share their settings and seed (a fair comparison)."""
    if not {"hc", "mhc"} <= set(chosen):
        return False
    hc, mhc = chosen["hc"], chosen["mhc"]
    return hc.seed == mhc.seed and _same_settings(view, hc, mhc)


def representative_note(view: ExperimentView, chosen: dict[str, RunView]) -> str:
    if len(chosen) < 2:
        return f"the {NAMES[next(iter(chosen))]} run with the largest peak gain"
    if is_pair(view, chosen):
        return "the HC run with the largest peak gain, and mHC at its settings and seed"
    return "each connection's run with the largest peak gain (no mHC run shares the HC run's settings)"


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
        axes[0, j].set_title(f"{NAMES[conn]}: {run.run_id}\nprobe at step {probe['step']}", fontsize=8.5,
                             color=COLORS[conn])
        axes[1, j].set_xlabel("layer index l (two layers per block)", fontsize=8.5)
        axes[1, j].xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    far = []
    for (i, j), ax in np.ndenumerate(axes):
        far += gain_axis(ax, kinds[i][1] if j == 0 else None, chosen if i == 1 else ())
    finish(fig, view, "gain by layer at the peak probe (paper Fig. 3)",
           [representative_note(view, chosen), *unique(far)],
           chosen, DIRECTION_KEYS)
    return [("gain_by_layer", fig)]


# -- 3b. the residual signal by layer ------------------------------------------------------


def fig_signal_by_layer(view: ExperimentView) -> list[tuple[str, Figure]]:
    chosen = representative_runs(view, ("hc", "mhc", "residual"))
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
    finish(fig, view, "the residual signal by layer",
           [note, f"solid: step {'/'.join(map(str, last))}; dotted: step {'/'.join(map(str, first))}"],
           measured)
    return [("signal_by_layer", fig)]


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
    diverged = any(r.status == "diverged" for r in view.plottable)
    keys = style_keys(("", "diverged: stopped here"), marker="x") if diverged else []
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


def mark_divergence(ax: Axes, run: RunView, curve: Curve) -> None:
    finite = np.isfinite(curve[1])
    if not finite.any():
        return
    x, y = curve[0][finite][-1], curve[1][finite][-1]
    ax.plot([x], [y], marker="x", color=COLORS[run.connection], markersize=8, markeredgewidth=2, zorder=4)
    ax.annotate(f"diverged @ {run.summary.get('diverged_step')}", (x, y), textcoords="offset points",
                xytext=(7, -3), ha="left", va="top", fontsize=7, color=COLORS[run.connection])


# -- 5. mixing matrices --------------------------------------------------------------------


def fig_mixing_matrices(view: ExperimentView) -> list[tuple[str, Figure]]:
    chosen = {c: r for c, r in representative_runs(view).items() if r.files.hres.exists()}
    if not chosen:
        raise Skip("no HC or mHC run with hres.npz")
    fig, axes = new_figure(len(chosen), 3, (3.7, 3.1))
    for i, (conn, run) in enumerate(chosen.items()):
        saved = run.load_hres()
        hres = np.asarray(saved["peak"], dtype=np.float64)  # (L, T, n, n)
        last = hres.shape[0] - 1
        panels = [("layer 0 (first)", token_mean(hres[0])), (f"layer {last} (last)", token_mean(hres[-1])),
                  (f"composite H_{last}···H_0", token_mean(composite_product(hres)))]
        for ax, (name, matrix) in zip(axes[i], panels):
            matrix_panel(fig, ax, matrix)
            ax.set_title(f"{NAMES[conn]}: {name}", fontsize=9, color=COLORS[conn], pad=14)
        axes[i, 0].set_ylabel(f"{run.run_id}, step {int(saved['peak_step'])}\nrow i (output stream)", fontsize=7.5)
    finish(fig, view, "mixing matrices H_res, mean over the probe tokens (paper Fig. 8)",
           [representative_note(view, chosen), "colour centred at 0, symlog where |value| > 10",
            "Σ: row sums at the right, column sums below; columns j = input stream"])
    return [("mixing_matrices", fig)]


def matrix_panel(fig: Figure, ax: Axes, matrix: np.ndarray) -> None:
    """An n x n heatmap, value in every cell, row sums at the right and column sums below."""
    n = matrix.shape[0]
    finite = matrix[np.isfinite(matrix)]
    vmax = float(np.abs(finite).max()) if finite.size and np.abs(finite).max() > 0 else 1.0
    norm = (mcolors.SymLogNorm(linthresh=1.0, vmin=-vmax, vmax=vmax) if vmax > 10
            else mcolors.Normalize(vmin=-vmax, vmax=vmax))
    image = ax.imshow(np.where(np.isfinite(matrix), matrix, np.nan), cmap=_cmap("RdBu_r"), norm=norm)
    bar = fig.colorbar(image, ax=ax, shrink=0.75, pad=0.16, aspect=25)
    bar.ax.tick_params(labelsize=7)
    bar.ax.yaxis.set_major_formatter(ticker.FuncFormatter(fmt_tick))
    size = 8 if n <= 4 else 6
    for i, j in itertools.product(range(n), range(n)):
        value = matrix[i, j]
        dark = math.isfinite(value) and abs(norm(value) - 0.5) > 0.3
        ax.text(j, i, fmt_number(value), ha="center", va="center", fontsize=size, color="white" if dark else "black")
    with np.errstate(over="ignore", invalid="ignore"):
        row_sums, col_sums = matrix.sum(1), matrix.sum(0)
    for i in range(n):
        ax.text(n - 0.4, i, f"Σ {fmt_number(row_sums[i])}", va="center", ha="left", fontsize=size - 1, clip_on=False)
    for j in range(n):
        ax.text(j, n - 0.4, f"Σ\n{fmt_number(col_sums[j])}", va="top", ha="center", fontsize=size - 1, clip_on=False)
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.xaxis.tick_top()
    ax.tick_params(length=0, labelsize=7)
    ax.grid(False)
    ax.spines[:].set_visible(False)


def _cmap(name: str) -> mcolors.Colormap:
    return matplotlib.colormaps[name].with_extremes(bad="0.75")  # non-finite cells in grey


# -- 6. sweep heatmaps ---------------------------------------------------------------------


def fig_sweep_heatmaps(view: ExperimentView) -> list[tuple[str, Figure]]:
    pairs = [(a, b) for a, b in itertools.combinations(view.numeric_axes(), 2) if crossed(view, a, b)]
    if not pairs:
        raise Skip("no two numeric settings are swept against each other (besides seed)")
    return [sweep_heatmap(view, *((a, b) if a == DEPTH else (b, a))) for a, b in pairs]


def crossed(view: ExperimentView, a: str, b: str) -> bool:
    """Whether the runs hold more (a, b) combinations than either axis has values: a grid,
    not two settings changed together."""
    cells = {(r.setting(a), r.setting(b)) for r in view.plottable
             if r.setting(a) is not None and r.setting(b) is not None}
    return len(cells) > max(len(view.axes[a]), len(view.axes[b]))


def sweep_heatmap(view: ExperimentView, x_key: str, y_key: str) -> tuple[str, Figure]:
    others = [k for k in view.axes if k not in (x_key, y_key)]
    rows = view.facets(others) if others else [{}]
    conns = [c for c in view.connections if any(
        r.connection == c and r.setting(x_key) is not None and r.setting(y_key) is not None for r in view.plottable)]
    xs, ys = view.axes[x_key], view.axes[y_key]
    grids = {(i, c): heat_values(view, row, c, x_key, y_key) for i, row in enumerate(rows) for c in conns}
    norm = _log_norm(list(grids.values()))
    fig, axes = new_figure(len(rows), len(conns), (1.2 + 0.8 * len(xs), 1.0 + 0.55 * len(ys)))
    for (i, conn), grid in grids.items():
        ax = axes[i, conns.index(conn)]
        heat_panel(ax, grid, norm, xs, ys)
        ax.set_title(NAMES[conn] + (f" ({describe(rows[i])})" if rows[i] else ""), fontsize=9, color=COLORS[conn])
        ax.set_xlabel(axis_name(x_key), fontsize=8.5)
        ax.set_ylabel(axis_name(y_key), fontsize=8.5)
    bar = fig.colorbar(axes[0, 0].images[0], ax=axes, shrink=0.85, aspect=20)
    bar.set_label("peak composite gain (log colour)", fontsize=8)
    bar.ax.tick_params(labelsize=7, which="both")
    log_ticks(bar.ax)
    finish(fig, view, f"peak gain over {short_name(y_key)} x {short_name(x_key)}",
           [f"cells: mean over {len(view.seeds)} seeds" if len(view.seeds) > 1 else "", "-: no run"])
    return f"sweep_heatmap_{_short(y_key)}_x_{_short(x_key)}", fig


def heat_values(view: ExperimentView, row: dict, conn: str, x_key: str, y_key: str) -> np.ndarray:
    """Mean (over seeds) peak gain per (y, x) cell; NaN where there is no run."""
    xs, ys = view.axes[x_key], view.axes[y_key]
    grid = np.full((len(ys), len(xs)), np.nan)
    for (i, y), (j, x) in itertools.product(enumerate(ys), enumerate(xs)):
        cell = {**row, x_key: x, y_key: y}
        gains = [r.peak_gain for r in view.plottable if r.connection == conn and matches(r, cell)]
        gains = [g for g in gains if not math.isnan(g)]
        if gains:
            grid[i, j] = float(np.mean(gains))
    return grid


def _log_norm(grids: list[np.ndarray]) -> mcolors.LogNorm:
    values = np.concatenate([g[np.isfinite(g) & (g > 0)] for g in grids])
    lo, hi = (float(values.min()), float(values.max())) if values.size else (1.0, 1.0)
    if hi <= lo * 1.01:
        lo, hi = lo / 1.05, hi * 1.05
    return mcolors.LogNorm(vmin=lo, vmax=hi)


def heat_panel(ax: Axes, grid: np.ndarray, norm: mcolors.Normalize, xs: list, ys: list) -> None:
    ax.imshow(np.where(np.isfinite(grid), grid, np.nan), cmap=_cmap("viridis"), norm=norm, origin="lower",
              aspect="auto")
    for i, j in itertools.product(range(len(ys)), range(len(xs))):
        value = grid[i, j]
        light = math.isfinite(value) and norm(value) > 0.6  # viridis turns yellow: dark text
        ax.text(j, i, "-" if math.isnan(value) else fmt_number(value), ha="center", va="center", fontsize=8,
                color="black" if light else "white")
    ax.set_xticks(range(len(xs)), [format_value(x) for x in xs])
    ax.set_yticks(range(len(ys)), [format_value(y) for y in ys])
    ax.grid(False)
    ax.spines[:].set_visible(False)


def _short(key: str) -> str:
    return key.split(".")[-1]


# -- driver --------------------------------------------------------------------------------

Builder = Callable[[ExperimentView], list[tuple[str, Figure]]]
FIGURES: tuple[tuple[str, Builder], ...] = (
    ("gain_vs_step", fig_gain_vs_step),
    ("gain_vs_scale", fig_gain_vs_scale),
    ("gain_by_layer", fig_gain_by_layer),
    ("loss_and_grad_norm", fig_loss_and_grad),
    ("mixing_matrices", fig_mixing_matrices),
    ("signal_by_layer", fig_signal_by_layer),
    ("sweep_heatmap", fig_sweep_heatmaps),
)


def plot_experiment(view: ExperimentView, out_dir: Optional[Path] = None, fmt: str = "png",
                    keep_fresh: bool = False, on_event: Callable[[str], None] = lambda line: None) -> PlotResult:
    """Draw every figure the sweep has data for into `out_dir` (default <results>/figures).

    `keep_fresh`: leave a figure file alone when it is newer than every run's results.
    `on_event` receives one line per figure: its path, or `skipped NAME: why`.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out_dir = Path(out_dir) if out_dir is not None else view.store.root / "figures"
    result = PlotResult()
    if not view.plottable:
        result.skipped.append("all figures: no run has data to draw (none finished, or all failed)")
        on_event(f"skipped {result.skipped[-1]}")
        return result
    out_dir.mkdir(parents=True, exist_ok=True)
    newest = _newest_result(view)
    for name, build in FIGURES:
        try:
            figures = build(view)
        except Skip as why:
            result.skipped.append(f"{name}: {why}")
            on_event(f"skipped {name}: {why}")
            continue
        for stem, fig in figures:
            path = out_dir / f"{stem}.{fmt}"
            if not (keep_fresh and path.exists() and path.stat().st_mtime >= newest):
                fig.savefig(path, dpi=DPI, format=fmt)
            result.written.append(path)
            on_event(str(path))
    return result


def _newest_result(view: ExperimentView) -> float:
    paths = [p for r in view.runs for p in (r.files.summary, r.files.probes, r.files.hres) if p.exists()]
    return max((p.stat().st_mtime for p in paths), default=0.0)
