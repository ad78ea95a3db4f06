"""Comparing folders: `mhc-lab plot A B --out DIR` overlays them, `mhc-lab report A B --out DIR`
tabulates the runs they share (same run id, or same connection and settings)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from matplotlib import colors as mcolors

from mhc_lab.analysis.compare import comparison_table, open_comparison
from mhc_lab.analysis.plots.compare import fig_compare_gain, fig_compare_loss, fig_compare_peak
from mhc_lab.analysis.plots.style import COLORS

from .helpers import cli, write_experiment
from .results_fixtures import FAST, copy_results, results_folder

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURES = ("compare_gain_vs_step", "compare_loss_and_grad", "compare_peak_gain")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    return results_folder("sweep", tmp_path_factory)


@pytest.fixture(scope="module")
def threads(tmp_path_factory) -> tuple[Path, Path]:
    """The same two runs trained with 1 and with 2 threads: other run ids, the same settings."""
    root = tmp_path_factory.mktemp("threads")
    exp = write_experiment(root, {**FAST, "name": "pair", "sweep": {"grid": {"model.connection": ["hc", "mhc"]}}})
    folders = []
    for n in (1, 2):
        assert cli("run", exp, "--out", root / f"t{n}", "--set", f"train.threads={n}").exit_code == 0
        folders.append(root / f"t{n}" / "pair")
    return folders[0], folders[1]


def _summaries(folder: Path) -> dict[str, dict]:
    return {p.name: json.loads((p / "summary.json").read_text()) for p in (folder / "runs").iterdir()}


def test_report_of_two_folders_tabulates_the_runs_they_share(sweep, tmp_path):
    other = copy_results(sweep, tmp_path / "again")
    result = cli("report", sweep, other, "--out", tmp_path / "cmp")
    assert result.exit_code == 0, result.output
    report = (tmp_path / "cmp" / "REPORT.md").read_text()
    labels = [f"{sweep.parent.name}/sweep", "again/sweep"]  # the same name twice: parent/name
    assert f"# Comparison: {labels[0]} vs {labels[1]}" in report
    assert "12 runs are in at least two of the 2 folders" in report
    for stem in FIGURES:
        assert (tmp_path / "cmp" / "figures" / f"{stem}.png").read_bytes()[:8] == PNG_MAGIC
        assert f"(figures/{stem}.png)" in report
    for run_id, summary in _summaries(sweep).items():
        row = next(line for line in report.splitlines() if line.startswith(f"| {run_id} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[-1] == cells[-4] == f"{summary['final_val_loss']:.3f}"  # val loss, both folders


def test_runs_with_other_ids_but_the_same_settings_are_shared(threads):
    one, two = threads
    assert set(_summaries(one)).isdisjoint(_summaries(two))  # train.threads is in the run id
    comp = open_comparison([one, two])
    shared = comp.shared()
    assert sorted(s.connection for s in shared) == ["hc", "mhc"]
    table = comparison_table(comp)
    assert all(row[0].endswith("(ids differ)") for row in table.rows)
    assert [h for h in table.headers if "val loss" in h] == ["val loss (t1/pair)", "val loss (t2/pair)"]


def test_only_runs_of_the_same_settings_are_shared(sweep, threads):
    """The pair (depth 1, seed 0, 1 thread) is two of the sweep's twelve runs, same run ids."""
    comp = open_comparison([threads[0], sweep])
    shared = comp.shared()
    assert sorted(s.run_id for s in shared) == sorted(_summaries(threads[0]))
    assert "model.depth" in comp.axes  # the sweep sweeps it: a column of the table
    table = comparison_table(comp)
    assert "depth" in " ".join(table.headers) and len(table.rows) == 2


def test_plot_overlays_folders_into_out_with_the_palette(sweep, threads, tmp_path):
    result = cli("plot", sweep, threads[0], "--out", tmp_path / "figs", "--format", "svg")
    assert result.exit_code == 0, result.output
    assert "3 comparison figures written" in " ".join(result.output.split())
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == sorted(f"{s}.svg" for s in FIGURES)
    comp = open_comparison([sweep, threads[0]])
    palette = {mcolors.to_hex(c) for c in COLORS.values()}
    for build in (fig_compare_gain, fig_compare_loss, fig_compare_peak):
        fig = build(comp.views, comp.labels)
        colours = {mcolors.to_hex(line.get_color()) for ax in fig.axes for line in ax.get_lines()}
        assert colours and colours <= palette | {"#404040"}, build.__name__  # legend keys: dark grey
        legend = [t.get_text() for t in fig.legends[0].get_texts()]
        assert set(comp.labels) <= set(legend)  # labelled by folder


@pytest.mark.parametrize("command", ["plot", "report"])
def test_several_folders_need_out(sweep, tmp_path, command):
    result = cli(command, sweep, copy_results(sweep, tmp_path))
    assert result.exit_code == 2
    assert "needs --out DIR" in " ".join(result.output.split())


def test_bad_folder_sets_are_one_line(sweep, tmp_path):
    twice = cli("report", sweep, sweep, "--out", tmp_path / "x")
    assert twice.exit_code == 2 and "the same folder is given twice" in twice.output
    missing = cli("plot", sweep, tmp_path / "nothing", "--out", tmp_path / "x")
    assert missing.exit_code == 2 and "no such results folder" in missing.output
    one = cli("report", sweep, "--out", tmp_path / "x")
    assert one.exit_code == 2 and "--out is for comparing several folders" in " ".join(one.output.split())
    assert not (tmp_path / "x").exists()
