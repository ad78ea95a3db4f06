"""Tiny results folders built once per test session through the real CLI, for plot/report tests.

- `sweep`: residual / HC / mHC x depth 1, 2 x seeds 0, 1 (12 runs): every figure but heatmaps.
- `grid`: HC at three of the four cells of lr x depth (3 runs): a sweep heatmap.
- `single`: one HC run at one depth, plus a run that fails (seq_len longer than the held-out
  data): figures whose data is absent are skipped; the failed run only shows in the report.

Tests that modify a folder copy it first (`copy_results`). A test that edits a run's files to
stand for results a run could have written (a dead run, an older format) reseals the run
(`reseal`): its summary.json then records the edited files, as if the run had written them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .helpers import cli, write_experiment

FAST = {"train": {"steps": 4, "batch_size": 2, "seq_len": 16, "lr": 1e-2, "warmup": 1, "threads": 1},
        "probe": {"every": 2, "val_batches": 1}}
EXPERIMENTS = {
    "sweep": {"sweep": {"grid": {"model.connection": ["residual", "hc", "mhc"], "model.depth": [1, 2],
                                 "seed": [0, 1]}}},
    "grid": {"model": {"connection": "hc"},  # three cells of a 2 x 2 grid: one stays empty
             "sweep": {"grid": {}, "points": [{"model.depth": 1, "train.lr": 1e-2},
                                              {"model.depth": 2, "train.lr": 1e-2},
                                              {"model.depth": 1, "train.lr": 3e-3}]}},
    "single": {"sweep": {"grid": {}, "points": [{"model.connection": "hc"},
                                                {"model.connection": "hc", "train.seq_len": 40_000}]}},
}
_built: dict[str, Path] = {}


def results_folder(kind: str, tmp_path_factory) -> Path:
    """The experiment folder of `kind` (built on first use; shared by every test module)."""
    if kind not in _built:
        root = tmp_path_factory.mktemp(f"results-{kind}")
        exp = write_experiment(root, {**FAST, "name": kind, **EXPERIMENTS[kind]})
        result = cli("run", exp, "--out", root / "results")
        assert result.exit_code in (0, 1), result.output  # 1: the `single` sweep has a failed run
        _built[kind] = root / "results" / kind
    return _built[kind]


def copy_results(folder: Path, to: Path) -> Path:
    """A private copy of an experiment folder (for tests that change or add files)."""
    target = to / folder.name
    shutil.copytree(folder, target, ignore=shutil.ignore_patterns("figures", "REPORT.md"))
    return target


def reseal(run_dir: Path) -> None:
    """Record a run's files as they are now in its summary.json (store/integrity.py)."""
    from mhc_lab.store import RunFiles, record

    files = RunFiles(run_dir)
    summary = files.read_summary()
    summary["integrity"] = record(files)
    files.write_summary(summary)
