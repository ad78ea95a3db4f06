"""Comparison figures: several results folders overlaid, labelled by folder.

    compare_gain_vs_step     composite gain at every probe, forward and backward
    compare_loss_and_grad    training loss and pre-clip gradient norm
    compare_peak_gain        every run's peak composite gain, one column of points per folder

Colour is the connection (Okabe-Ito, as in every figure); line style (and marker, in the
peak-gain figure) is the folder. A row of panels per setting that the folders sweep or that
differs between them; lines are the mean over seeds, bands the min-max.
"""

from __future__ import annotations

import io
import textwrap
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ...store import atomic_write_bytes
from ..view import IGNORED_KEYS, SEED, ExperimentView, RunView, describe, matches
from . import FORMATS, PlotResult
from .style import (
    COLORS, DPI, GAIN_LABEL, LINESTYLES, MARKERS, NAMES, Skip, aggregate, by_connection, draw_band,
    gain_axis, hide, log_ticks, new_figure, step_axes, unique,
)

MAX_FACETS = 12
TITLES = {
    "compare_gain_vs_step": "Gain during training, folders overlaid",
    "compare_loss_and_grad": "Loss and gradient norm, folders overlaid",
    "compare_peak_gain": "Peak gain per run, by folder",
}
CAPTIONS = {
    "compare_gain_vs_step": "Composite gain at each probe (largest over layers), forward and backward; "
    "colour = connection, line style = folder; mean over seeds, band = min-max.",
    "compare_loss_and_grad": "Training loss and the gradient norm before clipping; colour = connection, "
    "line style = folder; mean over seeds, band = min-max.",
    "compare_peak_gain": "Each run's peak composite gain (forward or backward, over layers and probes), "
    "one column per folder; colour = connection.",
}


def compared_axes(views: Sequence[ExperimentView]) -> list[str]:
    """Every setting swept in any folder, or differing between the folders' runs."""
    keys = {k for v in views for k in v.axes}
    runs = [r for v in views for r in v.plottable]
    for key in {k for r in runs for k in r.config} - IGNORED_KEYS - {SEED, "model.connection"}:
        if len({repr(r.setting(key)) for r in runs if r.setting(key) is not None}) > 1:
            keys.add(key)
    return sorted(keys)


def facets(views: Sequence[ExperimentView]) -> list[dict]:
    """The combinations of the compared settings that some run has ([{}] when none differ)."""
    keys = compared_axes(views)
    if not keys:
        return [{}]
    combos = []
    for run in (r for v in views for r in v.plottable):
        values = [run.setting(k) for k in keys]
        if None not in values and values not in combos:
            combos.append(values)
    combos.sort(key=lambda vs: [(not isinstance(v, (int, float)), v if isinstance(v, (int, float)) else str(v)) for v in vs])
    return [dict(zip(keys, vs)) for vs in combos] or [{}]


def _runs(view: ExperimentView, settings: dict, need: Callable[[RunView], bool]) -> list[RunView]:
    return [r for r in view.plottable if matches(r, settings) and need(r)]


def _facets_or_skip(views: Sequence[ExperimentView]) -> list[dict]:
    found = facets(views)
    if len(found) > MAX_FACETS:
        raise Skip(f"{len(found)} setting combinations differ between the folders (at most {MAX_FACETS} are drawn)")
    return found


def _legend(fig: Figure, title: str, labels: Sequence[str], connections: Sequence[str], notes: Sequence[str] = (),
            markers: bool = False) -> None:
    fig.suptitle(title, fontsize=11, fontweight="bold")
    handles = [Line2D([], [], color=COLORS[c], linewidth=2, label=NAMES[c]) for c in connections]
    handles += [Line2D([], [], color="0.25", linestyle="" if markers else LINESTYLES[i],
                       marker=MARKERS[i] if markers else "", label=label) for i, label in enumerate(labels)]
    detail = "; ".join(n for n in notes if n)
    fig.legend(handles=handles, loc="outside lower center", ncols=max(1, min(len(handles), 6)), fontsize=8,
               frameon=False, title=textwrap.fill(detail, int(fig.get_figwidth() * 15)) or None, title_fontsize=7.5)


def fig_compare_gain(views: Sequence[ExperimentView], labels: Sequence[str]) -> Figure:
    if not any(len(r.probes) > 1 for v in views for r in v.plottable):
        raise Skip("no run has more than one probe")
    rows = _facets_or_skip(views)
    fig, axes = new_figure(len(rows), 2, (4.0, 2.9), sharex=True, sharey=True)
    for i, settings in enumerate(rows):
        for j, direction in enumerate(("fwd", "bwd")):
            ax = axes[i, j]
            drawn = False
            for f, view in enumerate(views):
                for conn, group in by_connection(_runs(view, settings, lambda r: bool(r.probes))):
                    curves = [r.probe_series(lambda p, d=direction: p["headline"][f"max_gain_{d}"]) for r in group]
                    draw_band(ax, aggregate(curves), conn, LINESTYLES[f], marker="")
                    drawn = True
            if not drawn:
                hide(ax)
            name = "forward (row sums)" if direction == "fwd" else "backward (column sums)"
            ax.set_title(f"{describe(settings)}: {name}" if settings else name, fontsize=9)
    far = []
    connections = unique(c for v in views for c in v.connections)
    for (i, j), ax in np.ndenumerate(axes):
        if ax.has_data():
            far += gain_axis(ax, GAIN_LABEL if j == 0 else None, connections)
    step_axes(axes)
    _legend(fig, f"{' vs '.join(labels)}: composite gain during training", labels, connections,
            ["line = mean over seeds, band = min-max", *unique(far)])
    return fig


def fig_compare_loss(views: Sequence[ExperimentView], labels: Sequence[str]) -> Figure:
    if not any(r.metrics for v in views for r in v.plottable):
        raise Skip("no run has training metrics")
    rows = _facets_or_skip(views)
    fig, axes = new_figure(len(rows), 2, (4.0, 2.5), sharex=True)
    for i, settings in enumerate(rows):
        for j, metric in enumerate(("loss", "grad_norm")):
            ax = axes[i, j]
            drawn = False
            for f, view in enumerate(views):
                for conn, group in by_connection(_runs(view, settings, lambda r: bool(r.metrics))):
                    draw_band(ax, aggregate([r.metric(metric) for r in group]), conn, LINESTYLES[f], marker="")
                    drawn = True
            if not drawn:
                hide(ax)
                continue
            if metric == "grad_norm":
                ax.set_yscale("log")
                log_ticks(ax)
            name = "training loss (nats/byte)" if metric == "loss" else "grad norm (pre-clip)"
            ax.set_title(f"{describe(settings)}: {name}" if settings else name, fontsize=9)
    step_axes(axes)
    _legend(fig, f"{' vs '.join(labels)}: loss and gradient norm", labels,
            unique(c for v in views for c in v.connections), ["line = mean over seeds, band = min-max"])
    return fig


def fig_compare_peak(views: Sequence[ExperimentView], labels: Sequence[str]) -> Figure:
    rows = _facets_or_skip(views)
    cols = min(3, len(rows))
    grid_rows = -(-len(rows) // cols)
    fig, axes = new_figure(grid_rows, cols, (max(1.4 * len(views), 3.2), 2.9), sharey=True)
    connections = unique(c for v in views for c in v.connections)
    for index, ax in enumerate(axes.flat):
        if index >= len(rows):
            hide(ax, "")
            continue
        settings = rows[index]
        for f, view in enumerate(views):
            for c, conn in enumerate(connections):
                gains = [r.peak_gain for r in _runs(view, settings, lambda r: r.connection == conn)]
                gains = [g for g in gains if np.isfinite(g)]
                x = f + (c - (len(connections) - 1) / 2) * 0.18
                ax.plot([x] * len(gains), gains, linestyle="", marker=MARKERS[f], markersize=5,
                        color=COLORS[conn], alpha=0.85)
        ax.set_xticks(range(len(views)), labels, fontsize=8, rotation=15)
        ax.set_xlim(-0.6, len(views) - 0.4)
        if settings:
            ax.set_title(describe(settings), fontsize=9)
        if ax.has_data():
            gain_axis(ax, "peak composite gain" if index % cols == 0 else None, connections)
    _legend(fig, f"{' vs '.join(labels)}: peak composite gain per run", labels, connections,
            ["one point per run (seed)"], markers=True)
    return fig


COMPARE_FIGURES: tuple[tuple[str, Callable[[Sequence[ExperimentView], Sequence[str]], Figure]], ...] = (
    ("compare_gain_vs_step", fig_compare_gain),
    ("compare_loss_and_grad", fig_compare_loss),
    ("compare_peak_gain", fig_compare_peak),
)


def plot_comparison(views: Sequence[ExperimentView], labels: Sequence[str], out_dir: Path, fmt: str = "png",
                    on_event: Callable[[str], None] = lambda line: None) -> PlotResult:
    """Draw every comparison figure the folders have data for into `out_dir` (the written
    files, and the figures skipped with why)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    result = PlotResult()
    if not any(v.plottable for v in views):
        result.skipped.append("all figures: no run of any folder has data to draw")
        on_event(f"skipped {result.skipped[-1]}")
        return result
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, build in COMPARE_FIGURES:
        try:
            fig = build(views, labels)
            path = out_dir / f"{name}.{fmt}"
            buf = io.BytesIO()
            fig.savefig(buf, dpi=DPI, format=fmt)
            atomic_write_bytes(path, buf.getvalue())  # a reader sees the old figure or the new one
        except Skip as why:
            result.skipped.append(f"{name}: {why}")
            on_event(f"skipped {name}: {why}")
            continue
        except OSError:
            raise  # the folder: one line from the CLI
        except Exception as exc:  # noqa: BLE001 - one figure's failure must not stop the others
            result.failed.append(f"{name}: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
            on_event(f"failed {result.failed[-1]}")
            continue
        result.written.append(path)
        on_event(str(path))
    return result


def title(stem: str) -> str:
    return TITLES.get(stem, stem)


def figure_caption(stem: str) -> str:
    return CAPTIONS.get(stem, "")


__all__ = ["COMPARE_FIGURES", "compared_axes", "facets", "figure_caption", "plot_comparison", "title"]
