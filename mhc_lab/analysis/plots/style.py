"""Shared style and scaffolding of every figure: colours, names, number formats, panels,
facets, the paper's reference lines, and which runs the per-run figures show.

Colours are Okabe-Ito (colour-blind safe) and the same in every figure. Figures are built on
`matplotlib.figure.Figure` directly (Agg canvas: no pyplot state, no display).
"""

from __future__ import annotations

import math
import textwrap
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import matplotlib
import numpy as np
from matplotlib import colors as mcolors
from matplotlib import ticker
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ..view import DEPTH, ExperimentView, RunView, describe, group_runs, matches

# Okabe-Ito (colour-blind safe): grey, vermillion, blue; bluish green, reddish purple, orange
# (sky blue for mHC iterated to a tolerance, the series view.py calls mhc_tol)
COLORS = {"residual": "#555555", "hc": "#D55E00", "mhc": "#0072B2", "mhc_tol": "#56B4E9",
          "mhc_lite": "#009E73", "kromhc": "#CC79A7", "ortho": "#E69F00"}
NAMES = {"residual": "residual", "hc": "HC", "mhc": "mHC", "mhc_tol": "mHC (tol)", "mhc_lite": "mHC-lite",
         "kromhc": "KromHC", "ortho": "ortho"}
# residual thin and on top: it often hides under mHC's 1
LINE_WIDTH = {"residual": 1.1, "hc": 1.8, "mhc": 1.8, "mhc_tol": 1.6, "mhc_lite": 1.6, "kromhc": 1.6, "ortho": 1.6}
MIXING = ("hc", "mhc", "mhc_tol", "mhc_lite", "kromhc", "ortho")  # the series with a learned H_res
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

Curve = tuple[np.ndarray, np.ndarray]  # (x, y)


class Skip(Exception):
    """A figure the sweep has no data for; the message says why."""


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
    overflow: np.ndarray = field(default_factory=lambda: np.empty(0))  # x where a curve is +inf


def aggregate(curves: Sequence[Curve]) -> Band:
    """Align curves on the union of their x values and take mean / min / max per x of the
    finite values; the x where some curve overflowed (+inf) are kept in `overflow`."""
    xs = np.unique(np.concatenate([np.asarray(x, dtype=float) for x, _ in curves]))
    table = np.full((len(curves), len(xs)), np.nan)
    for row, (x, y) in enumerate(curves):
        table[row, np.searchsorted(xs, x)] = y
    nonfinite = int(np.isinf(table).sum())
    overflow = xs[np.isposinf(table).any(axis=0)]
    table[~np.isfinite(table)] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column is a gap
        return Band(xs, np.nanmean(table, 0), np.nanmin(table, 0), np.nanmax(table, 0), len(curves), nonfinite,
                    overflow)


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


class DistinctTicks(ticker.Formatter):
    """fmt_tick, with as many more significant digits as neighbouring ticks need to read
    differently: gains all near 1 get 0.99998, 1, 1.00002 rather than 1, 1, 1."""

    def __init__(self) -> None:
        self.digits = 4

    def set_locs(self, locs) -> None:
        values = np.unique([v for v in np.asarray(locs, dtype=float) if math.isfinite(v)])
        # neighbours a and b need about log10(max(|a|, |b|) / (b - a)) + 1 digits to differ
        needs = [math.log10(max(abs(a), abs(b)) / (b - a)) + 1 for a, b in zip(values, values[1:]) if b > a]
        self.digits = min(15, max([4, *(math.ceil(n) for n in needs)]))

    def __call__(self, value: float, pos=None) -> str:
        return f"{value:.{self.digits}g}"


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
    if view.damaged:
        notes = (*notes, f"left out: {len(view.damaged)} damaged run(s) ({', '.join(c.run_id for c in view.damaged)}; "
                 "mhc-lab check)")
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
    if len(band.overflow):  # a result too: clipped to the top edge, marked
        ax.plot(band.overflow, np.ones(len(band.overflow)), transform=ax.get_xaxis_transform(),
                linestyle="", marker=OVERFLOW_MARKER, markersize=7, color=color, clip_on=False, zorder=5)
    if band.nonfinite:
        ax.text(0.98, 0.02, f"{OVERFLOW_TEXT}: {band.nonfinite} value(s) overflowed (inf), drawn at the top edge",
                transform=ax.transAxes, fontsize=7, color="0.3", ha="right", va="bottom")


OVERFLOW_MARKER = "^"
OVERFLOW_TEXT = "▲"
OVERFLOW_KEY = "overflowed (inf): clipped to the top edge"


# -- runs that did not finish normally: marked in every figure -----------------------------

STATE_MARKERS = {"diverged": "x", "dead": "v"}
STATE_WORDS = {"diverged": "diverged: stopped here", "dead": "dead (gradient exactly 0) from here"}


def run_state(run: RunView) -> Optional[tuple[str, int]]:
    """("diverged", step it stopped at) or ("dead", first step of its zero gradient), or None."""
    if run.status == "diverged" and run.summary.get("diverged_step") is not None:
        return "diverged", int(run.summary["diverged_step"])
    stability = run.stability if run.metrics else None
    if stability is not None and stability.dead_from is not None:
        return "dead", int(stability.dead_from)
    return None


def state_note(run: RunView) -> str:
    """` (diverged at step 26)`, ` (dead from step 40)` or `` for titles and labels."""
    state = run_state(run)
    if state is None:
        return ""
    return f" (diverged at step {state[1]})" if state[0] == "diverged" else f" (dead from step {state[1]})"


def mark_state(ax: Axes, run: RunView, x: float, y: float) -> Optional[str]:
    """The run's state marker at (x, y) in its connection's colour; returns the state drawn."""
    state = run_state(run)
    if state is None or not (math.isfinite(x) and math.isfinite(y)):
        return None
    ax.plot([x], [y], linestyle="", marker=STATE_MARKERS[state[0]], markersize=8, markeredgewidth=2,
            color=COLORS[run.connection], markerfacecolor="none", zorder=6)
    return state[0]


def state_keys(states: Iterable[Optional[str]]) -> list[Line2D]:
    """Legend entries for the state markers drawn."""
    present = [s for s in STATE_MARKERS if s in set(states)]
    return [Line2D([], [], color="0.25", linestyle="", marker=STATE_MARKERS[s], markerfacecolor="none",
                   markeredgewidth=1.5, label=STATE_WORDS[s]) for s in present]


def overflow_key(axes: Iterable[Axes]) -> list[Line2D]:
    """The legend entry for clipped overflows, when some panel drew one."""
    drawn = any(line.get_marker() == OVERFLOW_MARKER and not line.get_clip_on()
                for ax in axes for line in ax.get_lines())
    return [Line2D([], [], color="0.25", linestyle="", marker=OVERFLOW_MARKER, label=OVERFLOW_KEY)] if drawn else []


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
    """Plain-number ticks on a log y axis; linear tick spacing when it spans under a decade,
    labelled with the digits that tell neighbouring ticks apart (DistinctTicks)."""
    lo, hi = ax.get_ylim()
    if hi / max(lo, 1e-300) < 10:
        ax.yaxis.set_major_locator(ticker.MaxNLocator(5, steps=[1, 2, 5, 10]))
        ax.yaxis.set_minor_locator(ticker.NullLocator())
    ax.yaxis.set_major_formatter(DistinctTicks())
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def paper_lines(ax: Axes, connections: Iterable[str]) -> list[str]:
    """Dotted lines at the paper's gains near the data; notes for the ones far above it."""
    if not ax.axison:  # a hidden panel (an unused cell of the grid)
        return []
    lo, hi = ax.get_ylim()
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi):  # no finite data (all overflowed)
        lo, hi = 0.5, 2.0
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


# -- the runs shown in the per-run figures -------------------------------------------------


def representative_runs(view: ExperimentView, connections: Sequence[str] = MIXING) -> dict[str, RunView]:
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
    first = NAMES[next(iter(chosen))]
    anchor = next(iter(chosen.values()))
    if all(r.seed == anchor.seed and _same_settings(view, r, anchor) for r in chosen.values()):
        return f"the {first} run with the largest peak gain, and the other connections at its settings and seed"
    return f"each connection's run with the largest peak gain (not all share the {first} run's settings)"


def colormap(name: str) -> mcolors.Colormap:
    return matplotlib.colormaps[name].with_extremes(bad="0.75")  # non-finite cells in grey
