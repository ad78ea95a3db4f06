"""`mhc-lab run` end to end: files, resume, determinism, divergence, failure, locking."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from mhc_lab import launch
from mhc_lab.store import ExperimentStore, SUMMARY_COLUMNS, exclusive_lock

from .helpers import InterruptAt, cli, run_contents, write_experiment


def _summary_rows(folder: Path) -> list[dict]:
    with open(folder / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_sweep_writes_the_results_store(tmp_path):
    exp = write_experiment(tmp_path)
    result = cli("run", exp, "--out", tmp_path / "results")
    assert result.exit_code == 0, result.output
    folder = tmp_path / "results" / "tiny"
    assert (folder / "experiment.yaml").read_text() == exp.read_text()
    rows = _summary_rows(folder)
    assert [r["connection"] for r in rows] == ["residual", "hc", "mhc"]
    assert set(SUMMARY_COLUMNS) <= set(rows[0])
    for row in rows:
        assert row["status"] == "completed" and row["steps_done"] == "6"
        run_dir = folder / "runs" / row["run_id"]
        metrics = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == list(range(6))
        assert {"loss", "grad_norm", "lr", "tokens_per_s"} <= set(metrics[0])
        probes = [json.loads(l) for l in (run_dir / "probes.jsonl").read_text().splitlines()]
        assert [p["step"] for p in probes] == [0, 2, 4, 6]
        layers = int(row["layers"])
        for kind in ("single", "composite"):
            for d in ("fwd", "bwd"):
                for k in ("amax", "inf"):
                    for agg in ("mean", "max"):
                        assert len(probes[-1][kind][d][k][agg]) == layers
        assert probes[0]["headline"]["max_gain"] == pytest.approx(1.0, abs=1e-6)  # mHC: float32 Sinkhorn
        for p in probes:
            assert len(p["stream_rms"]) == layers + 1
            assert p["signal_growth"] == pytest.approx(max(p["stream_rms"]) / p["stream_rms"][0])
        assert float(row["max_signal_growth"]) == pytest.approx(max(p["signal_growth"] for p in probes))
        with np.load(run_dir / "hres.npz") as z:
            n = int(row["n_streams"])
            assert z["peak"].shape == z["final"].shape == (layers, 16, n, n)
            assert int(z["final_step"]) == 6
        assert not (run_dir / "checkpoint.pt").exists()
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["environment"]["corpus_sha256"] and summary["environment"]["torch"]
        assert (run_dir / "config.yaml").exists()
    assert rows[0]["n_streams"] == "1" and rows[0]["max_gain_fwd"] == "1.0"


def test_rerun_skips_completed_runs(tmp_path):
    exp = write_experiment(tmp_path)
    assert cli("run", exp, "--out", tmp_path).exit_code == 0
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "tiny" / "runs").rglob("summary.json")}
    again = cli("run", exp, "--out", tmp_path)
    assert again.exit_code == 0
    assert "3 already done" in again.output
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "tiny" / "runs").rglob("summary.json")}


def test_same_config_and_seed_give_the_same_numbers(tmp_path):
    exp = write_experiment(tmp_path, {"sweep": {"grid": {"model.connection": ["hc"]}}})
    assert cli("run", exp, "--out", tmp_path / "a").exit_code == 0
    assert cli("run", exp, "--out", tmp_path / "b").exit_code == 0
    (run_a,) = (tmp_path / "a" / "tiny" / "runs").iterdir()
    (run_b,) = (tmp_path / "b" / "tiny" / "runs").iterdir()
    assert run_contents(run_a) == run_contents(run_b)
    other = write_experiment(tmp_path, {"seed": 1, "sweep": {"grid": {"model.connection": ["hc"]}}}, "other.yaml")
    assert cli("run", other, "--out", tmp_path / "c").exit_code == 0
    (run_c,) = (tmp_path / "c" / "tiny" / "runs").iterdir()
    assert run_contents(run_c)["metrics"] != run_contents(run_a)["metrics"]


@pytest.mark.parametrize("interrupt_step", [3, 4])
def test_interrupted_sweep_resumes_to_identical_results(tmp_path, interrupt_step):
    overrides = {"train": {"steps": 8}, "sweep": {"grid": {"model.connection": ["residual", "mhc"]}}}
    exp = write_experiment(tmp_path, overrides)
    assert cli("run", exp, "--out", tmp_path / "whole").exit_code == 0

    from mhc_lab.experiment.loader import load_experiment

    loaded = load_experiment(exp)
    with pytest.raises(KeyboardInterrupt):
        with launch.open_store(loaded, tmp_path / "cut") as store:
            launch.run_sweep(loaded, store, InterruptAt(interrupt_step, run_index=1))
    cut = tmp_path / "cut" / "tiny"
    partial = cut / "runs" / loaded.runs[1].run_id
    assert (partial / "checkpoint.pt").exists() and not (partial / "summary.json").exists()
    assert (cut / "runs" / loaded.runs[0].run_id / "summary.json").exists()

    resumed = cli("run", exp, "--out", tmp_path / "cut")
    assert resumed.exit_code == 0, resumed.output
    assert "1 already done" in resumed.output
    for run in loaded.runs:
        assert run_contents(cut / "runs" / run.run_id) == run_contents(tmp_path / "whole" / "tiny" / "runs" / run.run_id)


def test_keyboard_interrupt_through_the_cli_exits_130_and_keeps_results(tmp_path, monkeypatch):
    exp = write_experiment(tmp_path)
    from mhc_lab.launch import serial

    real = serial.execute_run
    calls = []

    def interrupt_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(serial, "execute_run", interrupt_second)
    result = cli("run", exp, "--out", tmp_path)
    assert result.exit_code == 130
    assert "resume" in result.output
    assert len(list((tmp_path / "tiny" / "runs").rglob("summary.json"))) == 1


def test_divergence_is_recorded_and_the_sweep_goes_on(tmp_path):
    exp = write_experiment(
        tmp_path,
        {
            "train": {"steps": 30, "lr": 5.0, "warmup": 0, "diverge_factor": 1.5},
            "sweep": {"grid": {}, "points": [{"model.connection": "hc"}, {"model.connection": "residual", "train.lr": 1e-3}]},
        },
    )
    result = cli("run", exp, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    rows = _summary_rows(tmp_path / "tiny")
    assert rows[0]["status"] == "diverged"
    assert int(rows[0]["steps_done"]) < 30 and rows[0]["diverged_step"] != ""
    assert rows[1]["status"] == "completed"
    summary = json.loads((tmp_path / "tiny" / "runs" / rows[0]["run_id"] / "summary.json").read_text())
    assert summary["reason"]


def test_a_failing_run_is_recorded_and_the_exit_code_says_so(tmp_path):
    corpus = tmp_path / "small.txt"
    corpus.write_bytes(bytes(range(256)) * 60)  # 15 KB: validation split of 1.5 KB
    exp = write_experiment(
        tmp_path,
        {
            "data": {"path": "small.txt", "max_bytes": 20_000},
            "sweep": {"grid": {}, "points": [{"train.seq_len": 4000}, {"train.seq_len": 16}]},
        },
    )
    result = cli("run", exp, "--out", tmp_path / "out")
    assert result.exit_code == 1
    rows = _summary_rows(tmp_path / "out" / "tiny")
    assert [r["status"] for r in rows] == ["failed", "completed"]
    failed = json.loads((tmp_path / "out" / "tiny" / "runs" / rows[0]["run_id"] / "summary.json").read_text())
    assert "shorter than seq_len" in failed["reason"]
    assert (tmp_path / "out" / "tiny" / "runs" / rows[0]["run_id"] / "error.txt").exists()


def test_second_run_on_the_same_folder_refuses(tmp_path):
    exp = write_experiment(tmp_path)
    with exclusive_lock(tmp_path / ".tiny.lock", tmp_path / "tiny"):
        result = cli("run", exp, "--out", tmp_path)
    assert result.exit_code == 2
    assert "another `mhc-lab run`" in result.output
    assert not (tmp_path / "tiny" / "runs").exists()


def test_fresh_moves_old_results_aside(tmp_path):
    exp = write_experiment(tmp_path, {"sweep": {"grid": {"model.connection": ["residual"]}}})
    assert cli("run", exp, "--out", tmp_path).exit_code == 0
    assert cli("run", exp, "--out", tmp_path, "--fresh").exit_code == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("tiny.old-")]
    assert len(aside) == 1 and (aside[0] / "summary.csv").exists()
    assert (tmp_path / "tiny" / "summary.csv").exists()


def test_a_changed_experiment_does_not_mix_with_old_results(tmp_path):
    exp = write_experiment(tmp_path, {"sweep": {"grid": {"model.connection": ["residual"]}}})
    assert cli("run", exp, "--out", tmp_path).exit_code == 0
    result = cli("run", exp, "--out", tmp_path, "--set", "train.steps=4")
    assert result.exit_code == 2 and "--fresh" in result.output


def test_a_grown_sweep_keeps_its_finished_runs_and_trains_only_the_new_ones(tmp_path):
    exp = write_experiment(tmp_path, {"sweep": {"grid": {"model.connection": ["residual"]}}})
    assert cli("run", exp, "--out", tmp_path).exit_code == 0
    first = next((tmp_path / "tiny" / "runs").iterdir())
    before = (first / "summary.json").read_bytes()
    grown = write_experiment(tmp_path, {"description": "now with HC",
                                        "sweep": {"grid": {"model.connection": ["residual", "hc"]}}},
                             name="grown.yaml")
    result = cli("run", grown, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert "1 already done" in result.output
    assert (first / "summary.json").read_bytes() == before  # not retrained
    assert len(list((tmp_path / "tiny" / "runs").iterdir())) == 2
    assert "now with HC" in (tmp_path / "tiny" / "resolved.yaml").read_text()
    shrunk = cli("run", exp, "--out", tmp_path)  # the HC run is not part of the old sweep
    assert shrunk.exit_code == 2 and "1 run(s) not in this sweep" in shrunk.output
    # An older job that finishes last rebuilds summary.csv from its own (smaller) sweep.
    store = ExperimentStore(tmp_path / "tiny")
    store.write_summary_csv([first.name])
    assert len(store.read_summary_csv()) == 2 and store.read_summary_csv()[0]["run_id"] == first.name


def test_a_changed_sweep_is_refused_while_a_job_of_the_old_one_is_queued(tmp_path):
    from mhc_lab.launch.inflight import JobRecord
    from mhc_lab.launch.slurm import record_jobs

    exp = write_experiment(tmp_path, {"sweep": {"grid": {"model.connection": ["residual"]}}})
    store = ExperimentStore(tmp_path / "tiny")
    store.root.mkdir()
    (store.root / "resolved.yaml").write_text("an older version\n")
    # submitted with --no-wait, not started: no run folder yet, only its line in jobs.json
    record_jobs(store, [JobRecord("residual-L2-C16-n1-s0-00000000", "1", "local", str(tmp_path), "t")])
    result = cli("run", exp, "--out", tmp_path)
    assert result.exit_code == 2 and "1 run(s) not in this sweep" in result.output
    assert (store.root / "resolved.yaml").read_text() == "an older version\n"


def test_dry_run_lists_runs_and_writes_nothing(tmp_path):
    exp = write_experiment(tmp_path)
    result = cli("run", exp, "--out", tmp_path / "out", "--dry-run", "--set", "model.depth=2")
    assert result.exit_code == 0
    assert "3 runs" in result.output and "pending" in result.output
    assert not (tmp_path / "out").exists()


def test_set_overrides_reach_the_runs(tmp_path):
    exp = write_experiment(tmp_path, {"sweep": {"grid": {"model.connection": ["hc"]}}})
    assert cli("run", exp, "--out", tmp_path, "--set", "train.steps=3", "--set", "model.n_streams=3").exit_code == 0
    (row,) = _summary_rows(tmp_path / "tiny")
    assert row["steps_done"] == "3" and row["n_streams"] == "3"


def test_ls_lists_experiments_and_status(tmp_path):
    exp = write_experiment(tmp_path, {"sweep": {"grid": {"model.connection": ["residual", "hc"]}}})
    assert cli("run", exp, "--out", tmp_path).exit_code == 0
    result = cli("ls", tmp_path)
    assert result.exit_code == 0
    assert result.output.count("completed") == 2
    assert cli("ls", tmp_path / "nothing").exit_code == 2
