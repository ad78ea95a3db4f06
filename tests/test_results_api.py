"""`mhc_lab.results.load`: a real results folder (built by the CLI) as tidy DataFrames whose
every number is the one in the run's files; a clear message without pandas."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from .results_fixtures import results_folder

pd = pytest.importorskip("pandas", reason='pandas not installed (pip install -e ".[pandas]")')

from mhc_lab import results  # noqa: E402

GAIN_COLUMNS = [f"{kind}_{d}_{k}_{agg}" for kind in ("single", "composite") for d in ("fwd", "bwd")
                for k in ("amax", "inf") for agg in ("mean", "max")]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    return results_folder("sweep", tmp_path_factory)


@pytest.fixture(scope="module")
def loaded(sweep):
    return results.load(sweep)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_runs_are_the_summary_rows(sweep, loaded):
    runs = loaded.runs
    assert len(runs) == 12 and runs["experiment"].eq("sweep").all()
    for run_dir in (sweep / "runs").iterdir():
        summary = json.loads((run_dir / "summary.json").read_text())
        row = runs.set_index("run_id").loc[run_dir.name]
        for key in ("connection", "depth", "seed", "status", "steps_done"):
            assert row[key] == summary[key], key
        for key in ("final_loss", "final_val_loss", "max_gain_fwd", "max_gain_bwd", "max_signal_growth"):
            assert row[key] == pytest.approx(float(summary[key])), key
        assert row["peak_gain"] == pytest.approx(max(float(summary["max_gain_fwd"]), float(summary["max_gain_bwd"])))
    assert runs["depth"].dtype.kind == "i" and runs["final_loss"].dtype.kind == "f"


def test_runs_carry_the_stability_after_warmup(sweep, loaded):
    from mhc_lab.analysis.view import load_view

    view = {r.run_id: r for r in load_view(sweep).runs}
    for _, row in loaded.runs.iterrows():
        stab = view[row["run_id"]].stability
        assert row["max_grad_norm"] == pytest.approx(stab.max_grad_norm)
        assert row["max_grad_norm_step"] == stab.grad_step and row["max_loss_rise_step"] == stab.rise_step
        assert row["max_loss_rise"] == pytest.approx(stab.loss_rise)
        metrics = _lines(sweep / "runs" / row["run_id"] / "metrics.jsonl")
        after = [m["grad_norm"] for m in metrics if m["step"] >= 1]  # FAST: warmup 1
        assert row["median_grad_norm"] == pytest.approx(float(np.median(after)))


def test_metrics_has_one_row_per_run_and_step(sweep, loaded):
    metrics = loaded.metrics
    assert list(metrics.columns[:5]) == ["experiment", "run_id", "connection", "seed", "step"]
    for run_dir in (sweep / "runs").iterdir():
        lines = _lines(run_dir / "metrics.jsonl")
        rows = metrics[metrics.run_id == run_dir.name]
        assert rows["step"].tolist() == [m["step"] for m in lines] == [0, 1, 2, 3]
        assert np.allclose(rows["loss"], [m["loss"] for m in lines])
        assert np.allclose(rows["grad_norm"], [m["grad_norm"] for m in lines])


def test_probes_have_one_row_per_run_probe_and_layer_with_every_gain(sweep, loaded):
    probes = loaded.probes
    assert set(GAIN_COLUMNS) <= set(probes.columns)
    assert {"hres_identity_dist", "hres_row_sum_err", "hres_col_sum_err", "stream_rms", "val_loss",
            "signal_growth", "headline_max_gain"} <= set(probes.columns)
    total = 0
    for run_dir in (sweep / "runs").iterdir():
        for record in _lines(run_dir / "probes.jsonl"):
            rows = probes[(probes.run_id == run_dir.name) & (probes.step == record["step"])]
            layers = len(record["composite"]["fwd"]["amax"]["mean"])
            assert rows["layer"].tolist() == list(range(layers))
            for column in GAIN_COLUMNS:
                kind, d, k, agg = column.split("_")
                assert np.allclose(rows[column], record[kind][d][k][agg]), column
            assert np.allclose(rows["hres_col_sum_err"], record["hres"]["col_sum_err"])
            assert np.allclose(rows["stream_rms"], record["stream_rms"][:layers])
            assert np.allclose(rows["val_loss"], record["val_loss"])
            total += layers
    assert len(probes) == total


def test_hres_arrays_on_request(sweep, loaded):
    run_id = loaded.runs.run_id[0]
    arrays = loaded.hres(run_id)
    with np.load(sweep / "runs" / run_id / "hres.npz") as saved:
        assert np.array_equal(arrays["peak"], saved["peak"]) and int(arrays["final_step"]) == int(saved["final_step"])
    assert arrays["peak"].ndim == 4
    assert set(loaded.hres()) == set(loaded.runs.run_id)
    with pytest.raises(KeyError, match="not a finished run"):
        loaded.hres("no-such-run")


def test_failed_runs_are_rows_with_their_reason(tmp_path_factory):
    single = results.load(results_folder("single", tmp_path_factory))
    failed = single.runs[single.runs.status == "failed"]
    assert len(failed) == 1 and failed.reason.iloc[0]
    assert failed.run_id.iloc[0] not in set(single.metrics.run_id)


def test_frames_of_several_folders_concatenate(loaded, tmp_path_factory):
    grid = results.load(results_folder("grid", tmp_path_factory))
    both = pd.concat([loaded.runs, grid.runs], ignore_index=True)
    assert both.groupby("experiment").size().to_dict() == {"sweep": 12, "grid": 3}
    assert "model.depth" not in grid.runs  # the summary's `depth` already names it


def test_without_pandas_a_clear_message(monkeypatch, sweep):
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas now raises ImportError
    with pytest.raises(ImportError, match=r'pip install -e "\.\[pandas\]"'):
        results.load(sweep)


def test_a_folder_that_is_not_one_is_one_line(tmp_path):
    from mhc_lab.errors import MhcLabError

    with pytest.raises(MhcLabError, match="no such results folder"):
        results.load(tmp_path / "nothing")
