"""Numbers the report derives beyond the summary (analysis/derived.py) and the long-run figure
helpers (moving average, learning-rate strip)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from mhc_lab.analysis.derived import growth_row, last_gain, schedule_phase
from mhc_lab.analysis.plots.training import fig_loss_and_grad, moving_average, smoothing_window
from mhc_lab.analysis.view import RunView, load_view
from mhc_lab.store import RunFiles

from .results_fixtures import results_folder


def _run(tmp_path, gains: list[float], steps: list[int], warmup: int, total: int, summary: dict | None = None) -> RunView:
    files = RunFiles(tmp_path / "runs" / "hc-test")
    files.root.mkdir(parents=True)
    with open(files.probes, "w") as f:
        for step, gain in zip(steps, gains):
            f.write(json.dumps({"step": step, "headline": {"max_gain": gain, "max_gain_fwd": gain,
                                                           "max_gain_bwd": gain / 2}}) + "\n")
    config = {"train.warmup": warmup, "train.steps": total, "model.connection": "hc"}
    return RunView(files, {"run_id": "hc-test", "connection": "hc", **(summary or {})}, config)


def test_growth_row_reads_first_crossing_share_peak_and_rate(tmp_path):
    steps = [0, 50, 100, 150, 200, 250, 300]
    gains = [1.0, 10.0, 1e3, 1e4, 1e5, 2e3, 5e3]  # log10: 0, 1, 3, 4, 5, then down
    row = growth_row(_run(tmp_path, gains, steps, warmup=80, total=300))
    assert row.first_above == 150
    # probes from step 80 on: 100, 150, 200, 250, 300 -> above 3000 at 150, 200, 300
    assert row.share_above == pytest.approx(3 / 5)
    assert (row.peak_step, row.peak_gain) == (200, 1e5)
    expected = np.polyfit([0, 50, 100, 150, 200], [0, 1, 3, 4, 5], 1)[0]
    assert row.slope == pytest.approx(expected)
    assert row.slope_after_warmup == pytest.approx(np.polyfit([100, 150, 200], [3, 4, 5], 1)[0])
    assert schedule_phase(200, 80, 300) == "55% into the decay after warmup"
    assert schedule_phase(40, 80, 300) == "in warmup (40/80)"
    assert schedule_phase(80, 80, 300).startswith("at the end of warmup")


def test_growth_row_of_a_run_that_never_passes_3000(tmp_path):
    row = growth_row(_run(tmp_path, [1.0, 2.0, 1.5], [0, 10, 20], warmup=5, total=20))
    assert row.first_above is None and row.share_above == 0.0


def test_last_gain_falls_back_to_the_last_probe(tmp_path):
    run = _run(tmp_path, [1.0, 8.0, 4.0], [0, 10, 20], warmup=5, total=20)
    assert last_gain(run, "fwd") == 4.0 and last_gain(run, "bwd") == 2.0
    recorded = _run(tmp_path / "b", [1.0], [0], warmup=0, total=1, summary={"final_gain_fwd": 7.0})
    assert last_gain(recorded, "fwd") == 7.0


def test_moving_average_is_a_trailing_mean_of_the_finite_points():
    x = np.arange(6.0)
    y = np.array([1.0, 3.0, 5.0, np.nan, 7.0, 9.0])
    _, smooth = moving_average((x, y), 2)
    assert smooth[0] == 1.0 and smooth[1] == 2.0 and smooth[2] == 4.0
    assert np.isnan(smooth[3])  # a non-finite point stays where it is
    assert smooth[4] == 7.0 and smooth[5] == 8.0  # the NaN is skipped in the window
    assert moving_average((x, y), 1) == (x, y)


def test_smoothing_is_automatic_for_long_runs_only(tmp_path_factory):
    view = load_view(results_folder("sweep", tmp_path_factory))
    assert smoothing_window(view, None) == 1  # 4-step runs: raw curves
    assert smoothing_window(view, 0) == 1 and smoothing_window(view, 7) == 7


def test_loss_figure_has_a_learning_rate_strip(tmp_path_factory):
    view = load_view(results_folder("sweep", tmp_path_factory))
    (_, fig), = fig_loss_and_grad(view)
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert "learning rate" in labels
    strip = fig.axes[labels.index("learning rate")]
    lr = strip.lines[0].get_ydata()
    steps, logged = view.plottable[0].metric("lr")
    assert np.allclose(lr, logged)


def test_hashed_split_and_long_runs_in_resolved_experiment(tmp_path_factory):
    """The growth experiment asks for what the issue requires (checked without training)."""
    from pathlib import Path

    from mhc_lab.experiment.loader import load_experiment

    exp = load_experiment(Path(__file__).resolve().parents[1] / "experiments" / "growth.yaml")
    cfgs = [r.config for r in exp.runs]
    assert {c.model.connection for c in cfgs} == {"residual", "hc", "mhc"} and {c.seed for c in cfgs} == {0, 1, 2}
    assert all(c.data.val_split == "hashed" and c.train.steps >= 1500 and c.probe.every == 50 for c in cfgs)
    assert all(c.model.depth == 24 and c.model.d_model == 64 and c.train.lr == 1e-2 for c in cfgs)
    assert all(c.train.grad_clip is None for c in cfgs)
    assert yaml.safe_load(exp.text)["name"] == "growth"


def test_only_series_settings_leave_the_axes(tmp_path):
    """sinkhorn_iters 20 (mhc) and 200 (mhc_tol) only tell series apart: no facet axis. A
    learning rate that differs only between connections stays an axis, so HC at 1e-2 and mHC
    at 3e-2 are never called runs at the same settings."""
    from mhc_lab.analysis.view import ExperimentView, _follows_series

    def run(conn, **config):
        files = RunFiles(tmp_path / conn)
        return RunView(files, {"run_id": conn, "connection": conn.split("-")[0], "status": "completed"},
                       {"model.connection": conn.split("-")[0], **config})

    tol = [run("mhc", **{"model.sinkhorn_iters": 20}),
           run("mhc-tol", **{"model.sinkhorn_iters": 200, "model.sinkhorn_tol": 1e-6})]
    assert tol[1].connection == "mhc_tol"
    assert _follows_series(tol, "model.sinkhorn_iters")
    lrs = [run("hc", **{"train.lr": 0.01}), run("mhc", **{"train.lr": 0.03})]
    assert not _follows_series(lrs, "train.lr")
    view = ExperimentView(store=None, runs=lrs)
    assert view.axes == {"train.lr": [0.01, 0.03]}
