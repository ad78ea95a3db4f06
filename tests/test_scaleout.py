"""Scaling out: --workers N, submitted jobs (submitit's local executor), torchrun + DDP.

Every path must leave the files a plain one-process sweep leaves (timing fields aside), and
resume the same way. Each test starts real processes, so the configs are the tiniest.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mhc_lab import launch
from mhc_lab.launch import workers
from mhc_lab.experiment.loader import dump_resolved, load_experiment

from .helpers import TIMING_KEYS, InterruptAt, cli, run_contents, write_experiment

REPO = Path(__file__).resolve().parents[1]

# Two runs, 6 steps, a global batch of 4 (splits over 2 ranks), and a 30 KB corpus file: each
# new process skips the scan of the standard library (its startup is most of these tests' time).
TWO_RUNS = {
    "data": {"path": "corpus.txt", "max_bytes": 30_000},
    "train": {"steps": 6, "batch_size": 4},
    "sweep": {"grid": {"model.connection": ["hc", "mhc"]}},
}


def two_run_experiment(folder: Path, **sections) -> Path:
    """The TWO_RUNS experiment (plus `sections`) in `folder`, with its corpus file beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.txt").write_bytes(Path(os.__file__).read_bytes()[:30_000])
    return write_experiment(folder, {**TWO_RUNS, **sections})


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The TWO_RUNS experiment trained by one plain process: what every other path must equal."""
    folder = tmp_path_factory.mktemp("reference")
    assert cli("run", two_run_experiment(folder), "--out", folder / "out").exit_code == 0
    return folder / "out" / "tiny"


def _csv_rows(folder: Path) -> list[dict]:
    with open(folder / "summary.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in csv.DictReader(f)]


def assert_same_results(a: Path, b: Path) -> None:
    """Two experiment folders hold the same results: every run's files, summary.csv, configs."""
    assert _csv_rows(a) == _csv_rows(b)
    assert (a / "resolved.yaml").read_text() == (b / "resolved.yaml").read_text()
    runs_a = sorted(p.name for p in (a / "runs").iterdir())
    assert runs_a == sorted(p.name for p in (b / "runs").iterdir())
    for rid in runs_a:
        assert sorted(p.name for p in (a / "runs" / rid).iterdir()) == sorted(p.name for p in (b / "runs" / rid).iterdir())
        assert run_contents(a / "runs" / rid) == run_contents(b / "runs" / rid), rid


# -- local parallel sweeps -------------------------------------------------------------------


def test_two_workers_leave_the_files_of_one(tmp_path, reference):
    exp = two_run_experiment(tmp_path)
    two = cli("run", exp, "--out", tmp_path / "two", "--workers", "2")
    assert two.exit_code == 0, two.output
    assert "2 runs: 2 completed" in two.output and "sweep: 2 runs, 0 already done" in two.output
    assert two.output.count(": completed;") == 2  # each run's finished line, as with one worker
    assert_same_results(reference, tmp_path / "two" / "tiny")
    again = cli("run", exp, "--out", tmp_path / "two", "--workers", "2")
    assert again.exit_code == 0 and "2 already done" in again.output


def test_without_fixed_threads_workers_agree_to_float_rounding(tmp_path):
    """train.threads null: a run gets the threads its launcher gives it (every core with one
    worker, cores / 2 with two), and reductions sum in another order. docs/scaling-out.md
    states the consequence: equal to float rounding here, bit-identical only with
    train.threads set (test_two_workers_leave_the_files_of_one)."""
    exp = two_run_experiment(tmp_path, train={"steps": 6, "batch_size": 4, "threads": None})
    assert cli("run", exp, "--out", tmp_path / "one").exit_code == 0
    assert cli("run", exp, "--out", tmp_path / "two", "--workers", "2").exit_code == 0
    one, two = _csv_rows(tmp_path / "one" / "tiny"), _csv_rows(tmp_path / "two" / "tiny")
    assert [r["run_id"] for r in one] == [r["run_id"] for r in two]
    for a, b in zip(one, two):
        for key in ("final_loss", "final_val_loss", "max_gain_fwd", "max_gain_bwd"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-5), (a["run_id"], key)


def test_an_interrupted_parallel_sweep_resumes_to_the_same_results(tmp_path, reference):
    exp = two_run_experiment(tmp_path)
    loaded = load_experiment(exp)
    with pytest.raises(KeyboardInterrupt):
        with launch.open_store(loaded, tmp_path / "cut") as store:
            launch.run_sweep(loaded, store, InterruptAt(5, run_id=loaded.runs[1].run_id), workers=2)
    cut = tmp_path / "cut" / "tiny" / "runs" / loaded.runs[1].run_id
    assert not (cut / "summary.json").exists()  # stopped mid-run, its checkpoint kept
    resumed = cli("run", exp, "--out", tmp_path / "cut", "--workers", "2")
    assert resumed.exit_code == 0, resumed.output
    assert_same_results(reference, tmp_path / "cut" / "tiny")


def test_workers_start_the_longest_runs_first():
    """The headline's 9 runs (grid order: residual, HC, mHC, each seeds 0-2) start as mHC, HC,
    residual, each in seed order: the longest-processing-time-first schedule."""
    exp = load_experiment(REPO / "experiments" / "divergence.yaml")
    ordered = workers.longest_first(exp.runs)
    assert [(r.config.model.connection, r.config.seed) for r in ordered] == [
        (c, s) for c in ("mhc", "hc", "residual") for s in (0, 1, 2)]
    # cost follows size: twice the steps or layers, four times for twice d_model
    cfg = exp.runs[0].config
    base = workers.estimated_cost(cfg)
    longer = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 300})})
    wider = cfg.model_copy(update={"model": cfg.model.model_copy(update={"d_model": 128})})
    assert workers.estimated_cost(longer) == pytest.approx(2 * base, rel=0.01)
    assert workers.estimated_cost(wider) == pytest.approx(4 * base)


def test_the_workers_launcher_submits_in_that_order(tmp_path, monkeypatch):
    """What the pool receives, in order (a stand-in pool records it and fails every run, so
    the sweep stops with the worker error instead of training)."""
    submitted = []

    class RecordingPool:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def submit(self, fn, exp, run, root):
            submitted.append(run.config.model.connection)
            future = cf.Future()
            future.set_exception(RuntimeError("not trained here"))
            return future

    monkeypatch.setattr(workers.cf, "ProcessPoolExecutor", RecordingPool)
    exp = load_experiment(write_experiment(tmp_path, {"sweep": {"grid": {"model.connection": ["residual", "hc", "mhc"]}}}))
    with pytest.raises(workers.WorkerError, match="not trained here"):
        with launch.open_store(exp, tmp_path / "out") as store:
            launch.run_sweep(exp, store, workers=2)
    assert submitted == ["mhc", "hc", "residual"]


# -- the launcher section --------------------------------------------------------------------


def test_the_launcher_changes_neither_run_ids_nor_the_experiment(tmp_path):
    exp = write_experiment(tmp_path)
    plain = load_experiment(exp)
    slurm = load_experiment(exp, ["launcher.kind=slurm", "launcher.partition=gpu", "launcher.workers=4"])
    assert [r.run_id for r in slurm.runs] == [r.run_id for r in plain.runs]
    assert dump_resolved(slurm) == dump_resolved(plain)  # so a launcher change never asks for --fresh
    assert "launcher" not in dump_resolved(plain)
    one = write_experiment(tmp_path, {"sweep": {"grid": {"model.connection": ["residual"]}}}, "one.yaml")
    assert cli("run", one, "--out", tmp_path / "out").exit_code == 0
    again = cli("run", one, "--out", tmp_path / "out", "--workers", "3", "--set", "launcher.time_min=5")
    assert again.exit_code == 0 and "1 already done" in again.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workers", "0"], "launcher.workers"),
        (["--workers", "2", "--launcher", "slurm"], "--workers applies to launcher kind local"),
        (["--no-wait"], "--no-wait applies to submitted jobs"),
        (["--launcher", "lsf"], "launcher.kind"),
        (["--device", "tpu"], "train.device"),
        (["--set", "launcher.partiton=gpu"], "did you mean 'partition'"),
    ],
)
def test_bad_scale_out_options_are_one_line_errors(tmp_path, args, message):
    exp = write_experiment(tmp_path)
    result = cli("run", exp, "--out", tmp_path / "out", *args)
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "out").exists()


def test_device_option_sets_train_device(tmp_path):
    exp = write_experiment(tmp_path, {"sweep": {"grid": {"model.connection": ["residual"]}}})
    assert cli("run", exp, "--out", tmp_path, "--device", "cpu").exit_code == 0
    (run_dir,) = (tmp_path / "tiny" / "runs").iterdir()
    assert "device: cpu" in (run_dir / "config.yaml").read_text()
    assert json.loads((run_dir / "summary.json").read_text())["environment"]["device"] == "cpu"


# -- submitted jobs (submitit) ---------------------------------------------------------------


def test_submitted_jobs_write_the_same_store(tmp_path, reference):
    pytest.importorskip("submitit")
    exp = two_run_experiment(tmp_path, launcher={"poll_s": 0.1})
    out = tmp_path / "jobs"
    first = cli("run", exp, "--out", out, "--launcher", "submitit-local", "--no-wait")
    assert first.exit_code == 0, first.output
    assert "submitted 2 runs as submitit-local jobs" in first.output and "not waiting" in first.output
    jobs = json.loads((out / "tiny" / "jobs.json").read_text())["jobs"]
    assert set(jobs) == {r.run_id for r in load_experiment(exp).runs}
    listed = cli("ls", out / "tiny")
    assert listed.exit_code == 0 and "job" in listed.output
    assert all(job["job_id"] in listed.output for job in jobs.values())
    # The same command again submits nothing twice: it waits for the jobs in flight.
    waited = cli("run", exp, "--out", out, "--launcher", "submitit-local")
    assert waited.exit_code == 0, waited.output
    assert "submitted 2 runs" not in waited.output
    assert json.loads((out / "tiny" / "jobs.json").read_text())["jobs"] == jobs
    assert_same_results(reference, out / "tiny")
    assert cli("ls", out / "tiny").output.count("finished") == 2


def test_ls_labels_jobs_from_their_state_and_the_run_files(tmp_path):
    pytest.importorskip("submitit")
    from mhc_lab.launch.inflight import JobRecord, submitted_view
    from mhc_lab.launch.slurm import record_jobs
    from mhc_lab.store import ExperimentStore

    store = ExperimentStore(tmp_path / "exp")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = str(tmp_path / "jobs")
    record_jobs(store, [
        JobRecord("queued", str(os.getpid()), "local", folder, "t"),
        JobRecord("training", str(os.getpid()), "local", folder, "t"),
        JobRecord("killed", str(dead.pid), "local", folder, "t"),
        JobRecord("done", str(dead.pid), "local", folder, "t"),
    ])
    store.run("training").root.mkdir(parents=True)
    store.run("training").metrics.write_text("")
    store.run("done").root.mkdir(parents=True)
    store.run("done").write_summary({"run_id": "done", "status": "completed"})
    view = submitted_view(store)
    assert {rid: state for rid, (_, state) in view.items()} == {
        "queued": "submitted", "training": "running", "killed": "interrupted", "done": "finished",
    }


def test_slurm_options_reach_the_sbatch_file(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    from mhc_lab.launch.slurm import make_executor
    from mhc_lab.store import ExperimentStore

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    launcher = {"kind": "slurm", "partition": "gpu", "time_min": 30, "gpus_per_node": 1, "cpus_per_task": 4,
                "mem_gb": 8, "setup": ["module load cuda"], "sbatch": {"account": "proj"}}
    exp = load_experiment(write_experiment(tmp_path, {"launcher": launcher}))
    executor = make_executor(exp, ExperimentStore(tmp_path / "out" / "tiny"))
    text = executor._executor._make_submission_file_text("python -m job", "uid")
    for line in ("--partition=gpu", "--time=30", "--gpus-per-node=1", "--cpus-per-task=4", "--mem=8GB",
                 "--account=proj", "module load cuda", "--job-name=mhc-tiny"):
        assert line in text, line


# -- data-parallel training (torchrun + DDP, gloo on CPU) ------------------------------------


def _close(a: float, b: float, rel: float = 1e-4) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-6)


def test_torchrun_two_processes_match_one_process(tmp_path, reference):
    """hc trains from scratch over 2 ranks; mhc resumes over 2 ranks from a checkpoint written
    by a one-process run. Both must match a one-process run of the same global batch."""
    exp = two_run_experiment(tmp_path)
    loaded = load_experiment(exp)
    hc, mhc = loaded.runs
    with pytest.raises(KeyboardInterrupt):
        with launch.open_store(loaded, tmp_path / "ddp") as store:
            launch.run_sweep(loaded, store, InterruptAt(3, run_id=mhc.run_id), only={mhc.run_id})
    assert (tmp_path / "ddp" / "tiny" / "runs" / mhc.run_id / "checkpoint.pt").exists()

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "mhc_lab.launch.torchrun", str(exp), "--out", str(tmp_path / "ddp"),
               "--run-id", hc.run_id, "--run-id", mhc.run_id]  # (torchrun itself would take `--run`)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 runs over 2 processes: 2 completed" in done.stdout

    for run in (hc, mhc):
        one = reference / "runs" / run.run_id
        two = tmp_path / "ddp" / "tiny" / "runs" / run.run_id
        assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
        a, b = run_contents(one), run_contents(two)
        assert [m["step"] for m in a["metrics"]] == [m["step"] for m in b["metrics"]] == list(range(6))
        for ma, mb in zip(a["metrics"], b["metrics"]):
            assert _close(ma["loss"], mb["loss"]) and _close(ma["grad_norm"], mb["grad_norm"]), (ma, mb)
        assert [p["step"] for p in a["probes"]] == [p["step"] for p in b["probes"]]
        for pa, pb in zip(a["probes"], b["probes"]):
            assert _close(pa["val_loss"], pb["val_loss"])
            assert _close(pa["headline"]["max_gain"], pb["headline"]["max_gain"])
        sa, sb = a["summary"], b["summary"]
        for key in ("final_loss", "final_val_loss", "max_gain_fwd", "max_gain_bwd"):
            assert _close(sa[key], sb[key]), key
        assert sb["environment"]["world_size"] == 2 and sb["status"] == "completed"
    assert [r["run_id"] for r in _csv_rows(tmp_path / "ddp" / "tiny")] == [hc.run_id, mhc.run_id]


def test_data_parallel_checks_its_input_before_starting(tmp_path, monkeypatch, capsys):
    exp = two_run_experiment(tmp_path)  # batch_size 4
    monkeypatch.setenv("WORLD_SIZE", "3")
    result = cli("run", exp, "--out", tmp_path / "out")  # `mhc-lab run` under torchrun goes data-parallel
    assert result.exit_code == 2
    assert "batch_size must be divisible by the number of processes (3)" in result.output
    assert not (tmp_path / "out").exists()
    from mhc_lab.launch.torchrun import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([str(exp), "--out", str(tmp_path / "out"), "--run-id", "hc-nope"]) == 2
    assert "--run-id hc-nope: no such run" in capsys.readouterr().err
