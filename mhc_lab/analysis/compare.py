"""Several results folders side by side: which runs they share, one comparison table, and the
comparison report (`mhc-lab plot A B --out DIR`, `mhc-lab report A B --out DIR`).

Two runs of different folders are the same run when they have the same run id or, failing
that, the same connection and settings: every setting of the resolved config except the ones
that never change the numbers (threads, device, torch.compile, checkpointing; view.py's
IGNORED_KEYS) and the ones the connection ignores. A run id hashes a superset of those, so the
same run id always means the same settings; the settings also match a rerun on another
machine or with another thread count (e.g. results/divergence and results/divergence-native).

Where the comparison goes: several folders always need `--out DIR` (no folder is the natural
home of a comparison). `plot` writes the comparison figures into DIR; `report` writes
DIR/REPORT.md with its figures in DIR/figures/. Folders are labelled by their name (by
parent/name where two share a name), in the order given.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from .. import __version__
from ..experiment.config import CONNECTIONS
from ..store import StoreError, atomic_write_text
from .plots import PlotResult
from .plots.compare import compared_axes, figure_caption, plot_comparison, title
from .plots.style import NAMES, fmt_number
from .report import TableData
from .view import IGNORED_KEYS, ExperimentView, RunView, load_view, short_name

MAX_FOLDERS = 4  # one line style per folder in the overlays (plots/style.py LINESTYLES)


@dataclass
class SharedRun:
    """One run present in at least two folders: its settings and the run of each folder."""

    connection: str
    seed: int
    settings: dict[str, Any]  # the compared folders' swept settings, for the table
    runs: dict[str, RunView]  # folder label -> run

    @property
    def run_id(self) -> str:
        ids = {r.run_id for r in self.runs.values()}
        first = next(iter(self.runs.values())).run_id
        return first if len(ids) == 1 else f"{first} (ids differ)"


@dataclass
class Comparison:
    """Results folders to compare, with their labels (module docstring)."""

    views: list[ExperimentView]
    labels: list[str]

    @property
    def by_label(self) -> dict[str, ExperimentView]:
        return dict(zip(self.labels, self.views))

    @property
    def connections(self) -> list[str]:
        present = {c for v in self.views for c in v.connections}
        return [c for c in CONNECTIONS if c in present]

    @property
    def axes(self) -> list[str]:
        """Every setting swept in any folder, or differing between the folders."""
        return compared_axes(self.views)

    def shared(self) -> list[SharedRun]:
        """The runs at least two folders share, in the first folder's order."""
        groups: dict[tuple, dict[str, RunView]] = {}
        for label, view in zip(self.labels, self.views):
            for run in view.runs:
                groups.setdefault(science_key(run), {}).setdefault(label, run)
        axes = self.axes
        out = []
        for runs in groups.values():
            if len(runs) >= 2:
                first = next(iter(runs.values()))
                settings = {k: first.setting(k) for k in axes if first.setting(k) is not None}
                out.append(SharedRun(first.connection, first.seed, settings, runs))
        return out


def science_key(run: RunView) -> tuple:
    """What makes two runs the same run: connection, seed and every setting that can change
    the numbers (see the module docstring)."""
    keys = sorted(set(run.config) - IGNORED_KEYS)
    return (run.connection,) + tuple((k, repr(run.setting(k))) for k in keys)


def folder_labels(paths: list[Path]) -> list[str]:
    """Each folder's name; parent/name for names that repeat."""
    names = [p.resolve().name for p in paths]
    return [f"{p.resolve().parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names)]


def open_comparison(paths: list[Path]) -> Comparison:
    """Load every folder (StoreError naming the first one that is not a results folder)."""
    if len(paths) > MAX_FOLDERS:
        raise StoreError(f"compare at most {MAX_FOLDERS} folders at once (got {len(paths)})")
    if len({p.resolve() for p in paths}) < len(paths):
        raise StoreError("the same folder is given twice")
    return Comparison([load_view(p) for p in paths], folder_labels(paths))


# -- the table -----------------------------------------------------------------------------


def comparison_table(comp: Comparison) -> TableData:
    """One row per shared run: its settings, then per folder the peak composite gain forward
    and backward and the final validation loss ('-' where a folder lacks the run)."""
    shared = comp.shared()
    keys = sorted({k for s in shared for k in s.settings})
    headers = ["run", "connection", "seed", *(short_name(k) for k in keys)]
    for label in comp.labels:
        headers += [f"peak fwd ({label})", f"peak bwd ({label})", f"val loss ({label})"]
    table = TableData(f"runs shared by {', '.join(comp.labels)}", headers, text_columns=2)
    for item in shared:
        row = [item.run_id, NAMES.get(item.connection, item.connection), str(item.seed)]
        row += ["-" if item.settings.get(k) is None else str(item.settings[k]) for k in keys]
        for label in comp.labels:
            run = item.runs.get(label)
            row += [_cell(run, "max_gain_fwd", fmt_number), _cell(run, "max_gain_bwd", fmt_number),
                    _cell(run, "final_val_loss", lambda v: f"{v:.3f}")]
        table.rows.append(row)
    return table


def _cell(run: Optional[RunView], key: str, fmt: Callable[[float], str]) -> str:
    if run is None:
        return "-"
    if run.failed:
        return "failed"
    value = run.number(key)
    return "-" if math.isnan(value) else fmt(value)


def comparison_reading(comp: Comparison) -> list[str]:
    """Per connection: how many shared runs, and each folder's largest peak gain over them."""
    shared = comp.shared()
    lines = [f"{len(shared)} runs are in at least two of the {len(comp.labels)} folders "
             f"(same run id, or same connection and settings)."]
    for conn in comp.connections:
        items = [s for s in shared if s.connection == conn]
        if not items:
            continue
        parts = []
        for label in comp.labels:
            gains = [s.runs[label].peak_gain for s in items if label in s.runs and not math.isnan(s.runs[label].peak_gain)]
            if gains:
                parts.append(f"{fmt_number(max(gains))} in {label}")
        lines.append(f"{NAMES[conn]} ({len(items)} shared runs): largest peak composite gain "
                     + ", ".join(parts) + ".")
    return lines


# -- the report ----------------------------------------------------------------------------


@dataclass
class ComparisonReport:
    """What `write_comparison_report` produced."""

    path: Path
    figures: PlotResult
    table: TableData
    reading: list[str] = field(default_factory=list)


def build_comparison_report(comp: Comparison, figures: PlotResult, out_dir: Path) -> str:
    parts = [f"# Comparison: {' vs '.join(comp.labels)}\n",
             f"Written by mhc-lab {__version__} on {time.strftime('%Y-%m-%d %H:%M')}.\n", "## Folders\n"]
    folders = TableData("folders", ["label", "folder", "experiment", "finished runs"], text_columns=3)
    for label, view in zip(comp.labels, comp.views):
        folders.rows.append([label, f"`{view.store.root}`", view.name, str(len(view.runs))])
    parts.append(folders.markdown())
    parts += ["## Shared runs\n",
              "Runs in at least two folders: the same run id, or the same connection and settings "
              "(threads, device, torch.compile and checkpointing aside). Peak gains are the largest "
              "composite gain (Amax, token mean) over layers and probes, forward and backward.\n"]
    table = comparison_table(comp)
    parts.append(table.markdown() if table.rows else "No run is in more than one folder.\n")
    parts.append("".join(f"- {line}\n" for line in comparison_reading(comp)))
    parts.append("## Figures\n")
    for path in figures.written:
        link = path.relative_to(out_dir).as_posix()
        parts.append(f"### {title(path.stem)}\n\n{figure_caption(path.stem)}\n\n![{path.stem}]({link})\n")
    if figures.skipped:
        parts.append("Not drawn:\n\n" + "".join(f"- {s}\n" for s in figures.skipped))
    return "\n".join(parts)


def write_comparison_report(comp: Comparison, out_dir: Path,
                            on_event: Callable[[str], None] = lambda line: None) -> ComparisonReport:
    """Draw the comparison figures into OUT/figures and write OUT/REPORT.md."""
    out_dir = Path(out_dir)
    figures = plot_comparison(comp.views, comp.labels, out_dir / "figures", "png", on_event=on_event)
    path = out_dir / "REPORT.md"
    atomic_write_text(path, build_comparison_report(comp, figures, out_dir))
    return ComparisonReport(path, figures, comparison_table(comp), comparison_reading(comp))

