"""`mhc-lab plot`: every figure the sweep has data for, skips with a message, clear errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from matplotlib import image as mimage

from mhc_lab.probe.gain import forward_composites
from mhc_lab.analysis.plots.style import aggregate, composite_product, fmt_number
from mhc_lab.analysis.view import load_view

from .helpers import cli
from .results_fixtures import copy_results, reseal, results_folder

SWEEP_FIGURES = (
    "gain_vs_step", "gain_vs_scale", "gain_by_layer", "loss_and_grad_norm", "mixing_matrices", "signal_by_layer",
    "constraint_health",
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    return results_folder("sweep", tmp_path_factory)


@pytest.fixture(scope="module")
def plotted(sweep):
    """The sweep plotted once with the default options."""
    result = cli("plot", sweep)
    assert result.exit_code == 0, result.output
    return result


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    pixels = mimage.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 200
    assert pixels.std() > 0.01  # not a blank canvas


def test_every_figure_of_the_sweep_is_a_valid_image(sweep, plotted):
    for stem in SWEEP_FIGURES:
        path = sweep / "figures" / f"{stem}.png"
        assert_png(path)
        assert str(path) in plotted.output.replace("\n", "")
    assert "skipped sweep_heatmap" in plotted.output  # depth is the only numeric axis
    assert "7 figures written, 1 skipped" in plotted.output  # constraint_health too


def test_the_sweep_axes_and_groups_come_from_the_resolved_configs(sweep):
    view = load_view(sweep)
    assert view.axes == {"model.depth": [1, 2]}
    assert view.connections == ["residual", "hc", "mhc"] and view.seeds == [0, 1]
    residual = next(r for r in view.runs if r.connection == "residual")
    assert residual.setting("model.n_streams") is None  # ignored by residual: matches every n


def test_two_crossed_numeric_axes_give_a_heatmap(tmp_path_factory):
    grid = results_folder("grid", tmp_path_factory)
    result = cli("plot", grid)
    assert result.exit_code == 0, result.output
    assert_png(grid / "figures" / "sweep_heatmap_lr_x_depth.png")


def test_figures_without_data_are_skipped_with_a_message(tmp_path_factory):
    single = results_folder("single", tmp_path_factory)
    result = cli("plot", single)
    assert result.exit_code == 0, result.output
    assert "skipped gain_vs_scale: no numeric setting" in result.output
    assert "skipped sweep_heatmap" in result.output
    for stem in ("gain_vs_step", "gain_by_layer", "loss_and_grad_norm", "mixing_matrices"):
        assert_png(single / "figures" / f"{stem}.png")
    assert not list((single / "figures").glob("gain_vs_scale.*"))


def test_default_folder_svg_format_and_out(tmp_path, tmp_path_factory, monkeypatch):
    """No argument: the most recently written experiment under ./results."""
    older = copy_results(results_folder("grid", tmp_path_factory), tmp_path / "results")
    newest = copy_results(results_folder("single", tmp_path_factory), tmp_path / "results")
    os.utime(older / "experiment.yaml", (1, 1))
    os.utime(older / "summary.csv", (1, 1))
    monkeypatch.chdir(tmp_path)
    result = cli("plot", "--format", "svg", "--out", "figs")
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert "gain_vs_step.svg" in files and all(name.endswith(".svg") for name in files)
    assert "sweep_heatmap_lr_x_depth.svg" not in files  # the older `grid` experiment was not plotted
    assert "<svg" in (tmp_path / "figs" / "gain_vs_step.svg").read_text()[:2000]
    assert not (newest / "figures").exists()


@pytest.mark.parametrize("where", ["empty", "missing", "root"])
def test_a_folder_that_is_not_results_is_one_clear_line(tmp_path, where, monkeypatch):
    target = {"empty": tmp_path, "missing": tmp_path / "nope", "root": None}[where]
    monkeypatch.chdir(tmp_path)  # `root`: no ./results here
    result = cli("plot", *([target] if target is not None else []))
    assert result.exit_code == 2
    assert "error:" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_non_finite_gains_do_not_crash_plotting(tmp_path, tmp_path_factory):
    folder = copy_results(results_folder("single", tmp_path_factory), tmp_path)
    run = next(p for p in (folder / "runs").iterdir() if (p / "hres.npz").exists())
    probes = [json.loads(line) for line in (run / "probes.jsonl").read_text().splitlines()]
    probes[-1]["headline"]["max_gain_fwd"] = "inf"
    probes[-1]["composite"]["fwd"]["amax"]["mean"][-1] = "inf"
    (run / "probes.jsonl").write_text("".join(json.dumps(p) + "\n" for p in probes))
    summary = json.loads((run / "summary.json").read_text())
    summary["max_gain_fwd"] = "inf"
    (run / "summary.json").write_text(json.dumps(summary))
    with np.load(run / "hres.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["peak"] = np.full(arrays["peak"].shape, 1e200)  # the composite overflows float64
    np.savez(run / "hres.npz", **arrays)
    reseal(run)
    result = cli("plot", folder)
    assert result.exit_code == 0, result.output
    assert_png(folder / "figures" / "mixing_matrices.png")


def _without_stream_rms(folder, which: slice):
    """Remove `stream_rms` from the probes `which` of every run, as older mhc-lab wrote them."""
    for run in (folder / "runs").iterdir():
        if (run / "probes.jsonl").exists():
            probes = [json.loads(line) for line in (run / "probes.jsonl").read_text().splitlines()]
            for p in probes[which]:
                p.pop("stream_rms")
            (run / "probes.jsonl").write_text("".join(json.dumps(p) + "\n" for p in probes))
            reseal(run)
    return folder


def test_signal_figure_is_skipped_for_results_without_stream_rms(tmp_path, tmp_path_factory):
    """Results written before the stream RMS was measured still plot; that figure says why not."""
    folder = _without_stream_rms(copy_results(results_folder("single", tmp_path_factory), tmp_path), slice(None))
    result = cli("plot", folder)
    assert result.exit_code == 0, result.output
    assert "skipped signal_by_layer: no probe recorded the stream RMS" in result.output
    assert_png(folder / "figures" / "gain_by_layer.png")


def test_signal_figure_uses_the_probes_that_measured_it(tmp_path, tmp_path_factory):
    """A run resumed across the upgrade has old probe lines (no stream RMS) before new ones."""
    folder = _without_stream_rms(copy_results(results_folder("single", tmp_path_factory), tmp_path), slice(0, 1))
    result = cli("plot", folder)
    assert result.exit_code == 0, result.output
    assert_png(folder / "figures" / "signal_by_layer.png")


def test_composite_product_matches_the_gain_module():
    h = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    expected = forward_composites(h)[-1].numpy()
    assert np.allclose(composite_product(h.numpy()), expected)


def test_aggregate_aligns_curves_and_drops_non_finite_values():
    band = aggregate([(np.array([0, 2]), np.array([1.0, 3.0])), (np.array([0, 2, 4]), np.array([3.0, np.inf, 5.0]))])
    assert band.x.tolist() == [0, 2, 4]
    assert band.mean.tolist() == [2.0, 3.0, 5.0] and band.lo.tolist() == [1.0, 3.0, 5.0]
    assert band.nonfinite == 1 and band.curves == 2


def test_number_formatting():
    assert [fmt_number(v) for v in (1.0, 0.948, 12.34, 2580.0, 1.2e5, float("inf"))] == \
        ["1", "0.948", "12.3", "2.6e3", "1.2e5", "inf"]


def test_constraint_health_draws_the_last_probe_of_the_mhc_runs(sweep):
    """Column errors and logit spreads by layer, one line per constrained connection, from the
    last probe's records; HC and the residual are not drawn (nothing constrains them)."""
    from mhc_lab.analysis.plots.constraint import fig_constraint_health

    view = load_view(sweep)
    (_, fig), = fig_constraint_health(view)
    col_axes = [ax for ax in fig.axes if ax.get_ylabel() == "worst |column sum - 1|"]
    assert col_axes and all(ax.get_yscale() == "log" for ax in col_axes)
    mhc = [r for r in view.runs if r.connection == "mhc" and r.setting("model.depth") == 1]
    expected = np.mean([np.maximum(r.probes[-1]["hres"]["col_sum_err"], 1e-9) for r in mhc], axis=0)
    drawn = [line.get_ydata() for line in col_axes[0].lines if len(line.get_ydata()) == len(expected)]
    assert any(np.allclose(y, expected) for y in drawn)


def test_constraint_health_is_skipped_without_mhc_runs(tmp_path_factory):
    from mhc_lab.analysis.plots.constraint import fig_constraint_health
    from mhc_lab.analysis.plots.style import Skip

    with pytest.raises(Skip, match="no mHC-family run"):
        fig_constraint_health(load_view(results_folder("grid", tmp_path_factory)))  # HC only

# -- issue #17: figures that do not hide anything ------------------------------------------


def test_tick_labels_tell_gains_near_1_apart():
    from mhc_lab.analysis.plots.style import draw_band, gain_axis, new_figure

    fig, axes = new_figure(1, 1, (4.0, 3.0))
    draw_band(axes[0, 0], aggregate([(np.arange(4), np.array([1.0, 1.00002, 1.00004, 1.00006]))]), "mhc")
    gain_axis(axes[0, 0], "gain")
    fig.canvas.draw()
    labels = [t.get_text() for t in axes[0, 0].get_yticklabels() if t.get_text()]
    assert len(labels) >= 3 and len(set(labels)) == len(labels), labels


def test_an_overflowed_value_is_drawn_clipped_and_marked():
    from mhc_lab.analysis.plots.style import OVERFLOW_MARKER, draw_band, gain_axis, new_figure

    fig, axes = new_figure(1, 1, (4.0, 3.0))
    draw_band(axes[0, 0], aggregate([(np.arange(3), np.array([1.0, np.inf, np.inf]))]), "hc")
    gain_axis(axes[0, 0], "gain", ["hc"])  # a panel whose data is mostly overflow still gets limits
    fig.canvas.draw()
    (clipped,) = [line for line in axes[0, 0].get_lines() if line.get_marker() == OVERFLOW_MARKER]
    assert list(clipped.get_xdata()) == [1.0, 2.0] and not clipped.get_clip_on()


def test_gain_vs_scale_gives_every_connection_its_own_marker(sweep):
    from mhc_lab.analysis.plots.gains import fig_gain_vs_scale
    from mhc_lab.analysis.plots.style import COLORS

    ((_, fig),) = fig_gain_vs_scale(load_view(sweep))
    markers = {}
    for line in fig.axes[0].get_lines():
        if line.get_marker() not in ("None", "", None) and line.get_linestyle() == "None":
            markers[line.get_markeredgecolor()] = (line.get_marker(), line.get_markersize())
    shown = {conn: markers[color] for conn, color in COLORS.items() if color in markers}
    assert set(shown) == {"residual", "hc", "mhc"}
    assert len({m for m, _ in shown.values()}) == 3 and len({s for _, s in shown.values()}) == 3


def test_diverged_and_dead_runs_are_marked_in_every_figure(tmp_path, sweep):
    from mhc_lab.analysis.plots import gains, training
    from mhc_lab.analysis.plots.style import STATE_MARKERS
    from .results_fixtures import reseal

    folder = copy_results(sweep, tmp_path)
    hc = sorted(p for p in (folder / "runs").iterdir() if p.name.startswith("hc-"))
    rows = [json.loads(line) for line in (hc[0] / "metrics.jsonl").read_text().splitlines()]
    for row in rows[1:]:  # dead: gradient exactly 0 from the second logged step on
        row["grad_norm"] = 0.0
    (hc[0] / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary = json.loads((hc[1] / "summary.json").read_text())
    summary.update(status="diverged", diverged_step=2, reason="non-finite loss (nan)")
    (hc[1] / "summary.json").write_text(json.dumps(summary))
    for run in hc[:2]:
        reseal(run)
    view = load_view(folder)
    for build in (gains.fig_gain_vs_step, gains.fig_gain_vs_scale, training.fig_loss_and_grad):
        ((stem, fig),) = build(view)
        drawn = {line.get_marker() for ax in fig.axes for line in ax.get_lines()}
        assert {STATE_MARKERS["dead"], STATE_MARKERS["diverged"]} <= drawn, stem
        legend = [t.get_text() for t in fig.legends[0].get_texts()]
        assert any("diverged" in t for t in legend) and any("dead" in t for t in legend), stem
