"""Matrix figures: the token-mean H_res of the peak probe (paper Fig. 8) and heatmaps of the
peak gain over two crossed swept settings."""

from __future__ import annotations

import itertools
import math
from typing import Optional

import numpy as np
from matplotlib import colors as mcolors
from matplotlib import ticker
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..view import DEPTH, ExperimentView, axis_name, describe, format_value, matches, short_name
from .style import (
    COLORS, NAMES, Skip, colormap, composite_product, finish, fmt_number, fmt_tick, log_ticks, new_figure,
    representative_note, representative_runs, run_state, state_note, token_mean,
)

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
        axes[i, 0].set_ylabel(f"{run.run_id}, step {int(saved['peak_step'])}{state_note(run)}\n"
                              "row i (output stream)", fontsize=7.5)
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
    image = ax.imshow(np.where(np.isfinite(matrix), matrix, np.nan), cmap=colormap("RdBu_r"), norm=norm)
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
    marks = {(i, c): heat_marks(view, row, c, x_key, y_key) for i, row in enumerate(rows) for c in conns}
    norm = _log_norm(list(grids.values()))
    fig, axes = new_figure(len(rows), len(conns), (1.2 + 0.8 * len(xs), 1.0 + 0.55 * len(ys)))
    for (i, conn), grid in grids.items():
        ax = axes[i, conns.index(conn)]
        heat_panel(ax, grid, norm, xs, ys, marks[i, conn])
        ax.set_title(NAMES[conn] + (f" ({describe(rows[i])})" if rows[i] else ""), fontsize=9, color=COLORS[conn])
        ax.set_xlabel(axis_name(x_key), fontsize=8.5)
        ax.set_ylabel(axis_name(y_key), fontsize=8.5)
    bar = fig.colorbar(axes[0, 0].images[0], ax=axes, shrink=0.85, aspect=20)
    bar.set_label("peak composite gain (log colour)", fontsize=8)
    bar.ax.tick_params(labelsize=7, which="both")
    log_ticks(bar.ax)
    marked = {m for grid in marks.values() for row in grid for m in row if m}
    finish(fig, view, f"peak gain over {short_name(y_key)} x {short_name(x_key)}",
           [f"cells: mean over {len(view.seeds)} seeds" if len(view.seeds) > 1 else "", "-: no run",
            *(f"{CELL_MARKS[state]}: a run of the cell {state}" for state in CELL_MARKS if state in marked)])
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


CELL_MARKS = {"diverged": "×", "dead": "†"}


def heat_marks(view: ExperimentView, row: dict, conn: str, x_key: str, y_key: str) -> list[list[str]]:
    """Per (y, x) cell: `diverged` or `dead` if one of its runs did, else ''."""
    xs, ys = view.axes[x_key], view.axes[y_key]
    marks = [["" for _ in xs] for _ in ys]
    for (i, y), (j, x) in itertools.product(enumerate(ys), enumerate(xs)):
        cell = {**row, x_key: x, y_key: y}
        states = {s[0] for r in view.plottable if r.connection == conn and matches(r, cell) and (s := run_state(r))}
        marks[i][j] = next((s for s in CELL_MARKS if s in states), "")
    return marks


def _log_norm(grids: list[np.ndarray]) -> mcolors.LogNorm:
    values = np.concatenate([g[np.isfinite(g) & (g > 0)] for g in grids])
    lo, hi = (float(values.min()), float(values.max())) if values.size else (1.0, 1.0)
    if hi <= lo * 1.01:
        lo, hi = lo / 1.05, hi * 1.05
    return mcolors.LogNorm(vmin=lo, vmax=hi)


def heat_panel(ax: Axes, grid: np.ndarray, norm: mcolors.Normalize, xs: list, ys: list,
               marks: Optional[list[list[str]]] = None) -> None:
    ax.imshow(np.where(np.isfinite(grid), grid, np.nan), cmap=colormap("viridis"), norm=norm, origin="lower",
              aspect="auto")
    for i, j in itertools.product(range(len(ys)), range(len(xs))):
        value = grid[i, j]
        light = math.isfinite(value) and norm(value) > 0.6  # viridis turns yellow: dark text
        mark = CELL_MARKS.get(marks[i][j], "") if marks else ""
        ax.text(j, i, ("-" if math.isnan(value) else fmt_number(value)) + mark, ha="center", va="center", fontsize=8,
                color="black" if light else "white")
    ax.set_xticks(range(len(xs)), [format_value(x) for x in xs])
    ax.set_yticks(range(len(ys)), [format_value(y) for y in ys])
    ax.grid(False)
    ax.spines[:].set_visible(False)


def _short(key: str) -> str:
    return key.split(".")[-1]
