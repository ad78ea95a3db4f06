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
    constraint_health         per layer at the last probe: the worst column error and the logit
                              spread of every doubly-stochastic connection (mHC and its variants)

"Gain" is the paper's Amax gain magnitude (gain.py, DESIGN.md section 3), token mean; a probe's
headline is its largest composite gain over layers. Where several seeds share a setting, lines
are their mean and the shaded band their min-max range. A gain that overflowed (stored as
"inf") is a result too: it is drawn clipped at the top edge of its panel and marked.

Every figure file is written atomically (temp file + rename): a reader sees the old figure or
the new one. A figure that cannot be drawn never stops the others: it is listed in
`PlotResult.failed` with its error, and the command says so at the end.

One module per figure family: gains.py, training.py, matrices.py, constraint.py; their shared style and
scaffolding in style.py. Figures are built on `matplotlib.figure.Figure` directly (Agg canvas:
no pyplot state, no display). Colours are Okabe-Ito (colour-blind safe), the same everywhere.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from matplotlib.figure import Figure

from ...store import StoreError, atomic_write_bytes, unwritable
from ..view import ExperimentView
from .constraint import fig_constraint_health
from .gains import fig_gain_by_layer, fig_gain_vs_scale, fig_gain_vs_step, fig_signal_by_layer
from .matrices import fig_mixing_matrices, fig_sweep_heatmaps
from .style import DPI, Skip
from .training import fig_loss_and_grad

FORMATS = ("png", "svg", "pdf")
TITLES = {
    "gain_vs_step": "Gain during training",
    "gain_vs_scale": "Peak gain against depth, scale and the other swept settings",
    "gain_by_layer": "Gain by layer (paper Fig. 3)",
    "loss_and_grad_norm": "Loss and gradient norm (paper Figs. 2 and 5)",
    "mixing_matrices": "Mixing matrices (paper Fig. 8)",
    "signal_by_layer": "Residual signal by layer",
    "sweep_heatmap": "Sweep heatmap",
    "constraint_health": "Constraint health",
}
CAPTIONS = {
    "gain_vs_step": "Composite gain at each probe (largest over layers), forward solid and "
    "backward dashed, one line per connection; dotted lines are the paper's values.",
    "gain_vs_scale": "Peak composite gain of each run (forward or backward, over layers and "
    "probes) against depth, parameter count and the other numeric swept settings: the scaling "
    "picture.",
    "gain_by_layer": "Single-layer and composite gain against layer index at the run's peak "
    "probe, HC beside mHC and its variants (the paper's Fig. 3).",
    "loss_and_grad_norm": "Training loss, its gap to the residual baseline with the same "
    "settings and seed, and the gradient norm before clipping (the paper's Figs. 2 and 5), over "
    "a strip with the learning-rate schedule; long runs get a moving average with the raw curve "
    "faint; x marks where a diverged run stopped.",
    "mixing_matrices": "H_res averaged over the probe tokens at the peak probe: first layer, "
    "last layer and the composite product H_{L-1}...H_0 (per token, float64, then averaged), "
    "with row and column sums (the paper's Fig. 8).",
    "signal_by_layer": "RMS of the hidden state entering each layer (all streams), relative to "
    "the embedding's, on the probe sequence after the last step (solid) and at step 0 (dotted): "
    "how far the residual signal itself grew, which the gain metric bounds through H_res.",
    "sweep_heatmap": "Peak composite gain over two swept settings (mean over seeds), one panel "
    "per connection.",
    "constraint_health": "Per layer at the last probe, for mHC and its exact variants: the worst "
    "|column sum - 1| over the probe tokens (Sinkhorn ends each iteration with the rows, so the "
    "columns carry its error; the exact variants sit at float rounding) and the spread of a "
    "token's H_res logits (finite Sinkhorn converges slowly above 30).",
}


@dataclass
class PlotResult:
    """What `plot_experiment` did: the figure files (written or kept), the figures skipped
    (no data for them) and those that failed (`name: error`, one line each)."""

    written: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


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
    ("constraint_health", fig_constraint_health),
)


def plot_experiment(view: ExperimentView, out_dir: Optional[Path] = None, fmt: str = "png",
                    keep_fresh: bool = False, on_event: Callable[[str], None] = lambda line: None,
                    smooth: Optional[int] = None) -> PlotResult:
    """Draw every figure the sweep has data for into `out_dir` (default <results>/figures).

    `keep_fresh`: leave a figure file alone when it is newer than every run's results.
    `on_event` receives one line per figure: its path, `skipped NAME: why` or `failed NAME: error`.
    `smooth`: moving-average window (logged steps) of the loss and gradient-norm curves;
    None = automatic (training.smoothing_window), 0 = raw curves only.
    StoreError (one line) if `out_dir` cannot be written; nothing is drawn then.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out_dir = Path(out_dir) if out_dir is not None else view.store.root / "figures"
    problem = unwritable(out_dir)
    if problem is not None:
        raise StoreError(f"{problem}: cannot write the figures to {out_dir}; give another folder with --out")
    result = PlotResult()
    if not view.plottable:
        result.skipped.append("all figures: no run has data to draw (none finished, or all failed)")
        on_event(f"skipped {result.skipped[-1]}")
        return result
    out_dir.mkdir(parents=True, exist_ok=True)
    newest = _newest_result(view)
    for name, build in FIGURES:
        try:
            figures = build(view, smooth) if name == "loss_and_grad_norm" else build(view)
            for stem, fig in figures:
                path = out_dir / f"{stem}.{fmt}"
                if not (keep_fresh and path.exists() and path.stat().st_mtime >= newest):
                    buf = io.BytesIO()
                    fig.savefig(buf, dpi=DPI, format=fmt)
                    atomic_write_bytes(path, buf.getvalue())
                result.written.append(path)
                on_event(str(path))
        except Skip as why:
            result.skipped.append(f"{name}: {why}")
            on_event(f"skipped {name}: {why}")
        except OSError:
            raise  # the folder: one line from the CLI, as for any file
        except Exception as exc:  # noqa: BLE001 - one figure's failure must not stop the others
            result.failed.append(f"{name}: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
            on_event(f"failed {result.failed[-1]}")
    return result


def _newest_result(view: ExperimentView) -> float:
    paths = [p for r in view.runs for p in (r.files.summary, r.files.probes, r.files.hres) if p.exists()]
    return max((p.stat().st_mtime for p in paths), default=0.0)
