"""No quiet surprises (issue #17): what `run` would refuse is said up front, and `--dry-run`
says all of it; a swept key given with --set is refused; `ls` tells a run training now from an
interrupted one; a run that cannot fit in memory is refused before training."""

from __future__ import annotations

import sys

import pytest

from mhc_lab.experiment.config import RunConfig
from mhc_lab.experiment.loader import load_experiment
from mhc_lab.nn.model import build_model
from mhc_lab.store import ExperimentStore, exclusive_lock
from mhc_lab.training import memory

from .helpers import cli, write_experiment


def last_line(result) -> str:
    return result.output.strip().splitlines()[-1]


@pytest.mark.parametrize("key, value, section", [
    ("model.connection", "hc", "sweep.grid"), ("seed", "3", "sweep.grid"), ("train.lr", "0.1", "sweep.points"),
])
def test_set_of_a_key_the_sweep_varies_is_refused(tmp_path, key, value, section):
    exp = write_experiment(tmp_path, {"sweep": {"grid": {"model.connection": ["residual", "hc"], "seed": [0, 1]},
                                                "points": [{"train.lr": 0.01}]}})
    for args in ([], ["--dry-run"]):
        result = cli("run", exp, "--out", tmp_path / "out", "--set", f"{key}={value}", *args)
        assert result.exit_code == 2, result.output
        assert f"--set {key}: {section} sets {key}" in last_line(result)
    assert not (tmp_path / "out").exists()
    fixed = cli("run", exp, "--out", tmp_path / "out", "--dry-run", "--set", "sweep.grid.seed=[3]")
    assert fixed.exit_code == 0 and "-s3-" in fixed.output  # changing the sweep itself is the way


def test_dry_run_foresees_a_changed_experiment_over_an_existing_folder(tmp_path):
    exp = write_experiment(tmp_path, {"sweep": {"grid": {"model.connection": ["residual"]}}})
    assert cli("run", exp, "--out", tmp_path).exit_code == 0
    result = cli("run", exp, "--out", tmp_path, "--set", "train.steps=4", "--dry-run")
    assert result.exit_code == 2 and "--fresh" in last_line(result)
    assert cli("run", exp, "--out", tmp_path, "--set", "train.steps=4", "--dry-run", "--fresh").exit_code == 0


def test_dry_run_foresees_a_folder_in_use(tmp_path):
    exp = write_experiment(tmp_path)
    with exclusive_lock(tmp_path / ".tiny.lock", tmp_path / "tiny"):
        result = cli("run", exp, "--out", tmp_path, "--dry-run")
    assert result.exit_code == 2 and "another `mhc-lab run`" in last_line(result)


def test_dry_run_foresees_a_missing_optional_dependency(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # `import submitit` now fails
    exp = write_experiment(tmp_path)
    result = cli("run", exp, "--out", tmp_path / "out", "--launcher", "submitit-local", "--dry-run")
    assert result.exit_code == 2 and "pip install 'mhc-lab[slurm]'" in last_line(result)


def test_a_run_that_cannot_fit_in_memory_is_refused_up_front(tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "machine_memory", lambda device: 100_000)  # bytes; a tiny run needs ~180 KB
    exp = write_experiment(tmp_path)
    for args in (["--dry-run"], []):
        result = cli("run", exp, "--out", tmp_path / "out", *args)
        assert result.exit_code == 2, result.output
        assert "needs at least" in last_line(result) and "of memory to train" in last_line(result)
        assert "97.7 KiB" in last_line(result)  # the machine's, named beside the estimate
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(memory, "machine_memory", lambda device: 400_000)  # one fits, three at once do not
    result = cli("run", exp, "--out", tmp_path / "out", "--workers", "3", "--dry-run")
    assert result.exit_code == 2 and "--workers 3: the 3 largest runs need at least" in last_line(result)


def test_the_memory_estimate_counts_the_model_exactly_and_the_activations_it_keeps():
    cfg = load_experiment(write_experiment_config()).runs[0].config
    params = sum(p.numel() for p in build_model(cfg.model, cfg.train.seq_len, cfg.seed).parameters())
    assert memory.parameter_count(cfg.model, cfg.train.seq_len) == params
    estimate = memory.estimate(cfg)
    assert estimate.weights == 16 * params
    t, m = cfg.train, cfg.model
    assert estimate.activations == 4 * t.batch_size * t.seq_len * (m.layers * m.n_streams * m.d_model + 2 * 256)


def write_experiment_config():
    import tempfile
    from pathlib import Path

    return write_experiment(Path(tempfile.mkdtemp()), {"model": {"connection": "hc"}, "sweep": {"grid": {}}})


def test_ls_tells_a_run_training_now_from_an_interrupted_one(tmp_path):
    exp = write_experiment(tmp_path, {"sweep": {"grid": {"model.connection": ["hc"]}}})
    run = load_experiment(exp).runs[0]
    files = ExperimentStore(tmp_path / "tiny").run(run.run_id)
    files.root.mkdir(parents=True)
    (tmp_path / "tiny" / "experiment.yaml").write_text(exp.read_text())
    files.metrics.write_text('{"step": 0, "loss": 5.0}\n')
    assert "interrupted" in cli("ls", tmp_path).output
    with exclusive_lock(files.lock, files.root):
        assert "training" in cli("ls", tmp_path).output
        assert "training" in cli("run", exp, "--out", tmp_path, "--dry-run").output


def test_run_config_estimate_is_independent_of_the_sweep(tmp_path):
    """RunConfig alone is enough (the launchers estimate before anything is built)."""
    estimate = memory.estimate(RunConfig())
    assert estimate.total > estimate.weights > 0
