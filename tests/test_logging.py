"""Live logging (the `logging` section): W&B offline and TensorBoard, read back with their own
formats; resume without duplicated or reordered steps; a failing backend never fails a run;
a backend that is not installed is refused before anything is written; `logging` is in no
run id. The W&B and TensorBoard tests skip (with the reason) where the package is missing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from mhc_lab import launch
from mhc_lab.experiment.loader import dump_resolved, load_experiment
from mhc_lab.training import runner
from mhc_lab.training.loggers import LoggerSet, MetricLogger

from .helpers import InterruptAt, cli, run_contents, write_experiment

needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                                 reason='wandb not installed (pip install -e ".[wandb]")')
needs_tensorboard = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                                       reason='tensorboard not installed (pip install -e ".[tensorboard]")')

STEPS = 6  # TINY_EXPERIMENT: 6 steps, a probe every 2, one block (2 layers)
PROBES = [0, 2, 4, 6]
OFFLINE_WANDB = {"wandb": {"project": "mhc-lab-tests", "mode": "offline", "tags": ["test"]}}


@pytest.fixture(autouse=True)
def _no_network_wandb(monkeypatch, tmp_path):
    """W&B offline, with its settings and cache in the test's folder (no network, no home)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / ".wandb-home"))


# -- reading the backends' files back --------------------------------------------------------


def wandb_records(run_file: Path) -> list:
    """The records of a W&B transaction log (`run-<id>.wandb`): W&B's LevelDB-style log of
    32 KiB blocks (a 7-byte `:W&B` header, then chunks with a 7-byte header: checksum, length,
    type full/first/middle/last), each record one `wandb_internal_pb2.Record`."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", run_file
    block, records, pending, pos = 32768, [], b"", 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the block's tail is padding
            pos += block - pos % block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:  # zero padding up to the block's end
            pos += block - pos % block if pos % block else 0
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_sessions(run_dir: Path) -> list[dict]:
    """Every W&B session (offline-run folder) of an mhc-lab run, oldest first: its run record,
    history rows {step: {key: value}} in the order written, and summary."""
    sessions = []
    for folder in sorted((run_dir / "wandb").glob("offline-run-*")):
        (run_file,) = folder.glob("run-*.wandb")
        session = {"run": None, "history": [], "summary": {}}
        for record in wandb_records(run_file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                session["run"] = record.run
            elif kind == "history":
                row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
                session["history"].append(row)
            elif kind == "summary":
                session["summary"].update({"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                                           for i in record.summary.update})
        sessions.append(session)
    return sessions


def tensorboard_scalars(tb_dir: Path) -> dict[str, list[int]]:
    """tag -> steps, as TensorBoard itself reads the event files (purged steps dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _steps_of(history: list[dict], key: str) -> list[int]:
    return [row["_step"] for row in history if key in row]


# -- what each backend writes ----------------------------------------------------------------


@needs_wandb
def test_wandb_offline_run_holds_every_step_probe_and_the_summary(tmp_path):
    exp = write_experiment(tmp_path, {"logging": OFFLINE_WANDB, "sweep": {"grid": {"model.connection": ["hc"]}}})
    result = cli("run", exp, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    (run_dir,) = (tmp_path / "out" / "tiny" / "runs").iterdir()
    (session,) = wandb_sessions(run_dir)
    run = session["run"]
    assert run.display_name == run_dir.name and run.run_group == "tiny"
    assert run.run_id.startswith(run_dir.name + "-")
    assert {"hc", "test"} <= set(run.tags)
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["model"]["connection"] == "hc" and config["train"]["steps"] == STEPS

    history = session["history"]
    assert _steps_of(history, "train/loss") == list(range(STEPS))
    for key in ("train/grad_norm", "train/lr", "train/tokens_per_s"):
        assert _steps_of(history, key) == list(range(STEPS)), key
    for key in ("probe/val_loss", "probe/gain", "probe/gain_fwd", "probe/gain_bwd", "probe/signal_growth",
                "hres/col_sum_err_max", "hres/identity_dist_mean", "gain_fwd_by_layer/0", "gain_bwd_by_layer/1"):
        assert _steps_of(history, key) == PROBES, key
    probes = [json.loads(line) for line in (run_dir / "probes.jsonl").read_text().splitlines()]
    last = next(row for row in history if row["_step"] == STEPS)
    assert last["probe/gain_fwd"] == pytest.approx(probes[-1]["headline"]["max_gain_fwd"])
    assert last["gain_bwd_by_layer/1"] == pytest.approx(probes[-1]["composite"]["bwd"]["amax"]["mean"][1])

    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("final_loss", "final_val_loss", "max_gain_fwd", "max_gain_bwd", "steps_done"):
        assert session["summary"][key] == pytest.approx(summary[key]), key
    assert session["summary"]["status"] == "completed"


@needs_tensorboard
def test_tensorboard_event_files_under_each_run_with_two_workers(tmp_path):
    """One tb/ folder per run (written by the worker processes), the same scalars as W&B."""
    exp = write_experiment(tmp_path, {"logging": {"tensorboard": True},
                                      "sweep": {"grid": {"model.connection": ["residual", "mhc"]}}})
    result = cli("run", exp, "--out", tmp_path / "out", "--workers", "2")
    assert result.exit_code == 0, result.output
    runs = sorted((tmp_path / "out" / "tiny" / "runs").iterdir())
    assert len(runs) == 2
    for run_dir in runs:
        scalars = tensorboard_scalars(run_dir / "tb")
        assert scalars["train/loss"] == list(range(STEPS))
        for tag in ("probe/val_loss", "probe/gain_fwd", "probe/gain_bwd", "probe/signal_growth",
                    "hres/row_sum_err_max", "gain_fwd_by_layer/0", "gain_fwd_by_layer/1"):
            assert scalars[tag] == PROBES, (run_dir.name, tag)
    # the whole sweep reads as one TensorBoard log root: a run per folder
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(tmp_path / "out" / "tiny"))
    mux.Reload()
    assert sorted(mux.Runs()) == sorted(f"runs/{r.name}/tb" for r in runs)


# -- resume ----------------------------------------------------------------------------------


def _interrupt_then_resume(tmp_path: Path, logging: dict) -> Path:
    """One HC run (8 steps) interrupted after step 5 (its checkpoint is at step 4, so steps 4
    and 5 are trained twice), then resumed through the CLI; returns the run's folder."""
    exp = write_experiment(tmp_path, {"logging": logging, "train": {"steps": 8},
                                      "sweep": {"grid": {"model.connection": ["hc"]}}})
    loaded = load_experiment(exp)
    with pytest.raises(KeyboardInterrupt):
        with launch.open_store(loaded, tmp_path / "out") as store:
            launch.run_sweep(loaded, store, InterruptAt(5))
    run_dir = tmp_path / "out" / "tiny" / "runs" / loaded.runs[0].run_id
    assert (run_dir / "checkpoint.pt").exists() and not (run_dir / "summary.json").exists()
    resumed = cli("run", exp, "--out", tmp_path / "out")
    assert resumed.exit_code == 0, resumed.output
    return run_dir


@needs_tensorboard
def test_tensorboard_resume_has_no_duplicate_or_reordered_step(tmp_path):
    run_dir = _interrupt_then_resume(tmp_path, {"tensorboard": True})
    assert len(list((run_dir / "tb").glob("events.out.tfevents.*"))) == 2  # one per session
    scalars = tensorboard_scalars(run_dir / "tb")
    assert scalars["train/loss"] == list(range(8))
    assert scalars["probe/gain"] == [0, 2, 4, 6, 8]


@needs_wandb
def test_wandb_resume_continues_the_same_run_without_duplicate_steps(tmp_path):
    run_dir = _interrupt_then_resume(tmp_path, OFFLINE_WANDB)
    first, second = wandb_sessions(run_dir)
    assert first["run"].run_id == second["run"].run_id  # resumed by id
    assert _steps_of(first["history"], "train/loss") == list(range(6))  # steps 0-5 before the cut
    steps = _steps_of(first["history"] + second["history"], "train/loss")
    assert steps == list(range(8))  # 4 and 5, trained again, are not sent twice
    assert _steps_of(first["history"] + second["history"], "probe/gain") == [0, 2, 4, 6, 8]
    assert second["summary"]["status"] == "completed"


@needs_wandb
def test_a_fresh_start_is_a_new_wandb_run(tmp_path):
    exp = write_experiment(tmp_path, {"logging": OFFLINE_WANDB, "sweep": {"grid": {"model.connection": ["hc"]}}})
    assert cli("run", exp, "--out", tmp_path / "out").exit_code == 0
    assert cli("run", exp, "--out", tmp_path / "out", "--fresh").exit_code == 0
    ids = set()
    for folder in (tmp_path / "out").glob("tiny*"):
        (run_dir,) = (folder / "runs").iterdir()
        ids |= {s["run"].run_id for s in wandb_sessions(run_dir)}
    assert len(ids) == 2


# -- launchers -------------------------------------------------------------------------------


@needs_tensorboard
def test_torchrun_logs_from_rank_zero_only(tmp_path):
    folder = tmp_path / "exp"
    folder.mkdir()
    (folder / "corpus.txt").write_bytes(Path(os.__file__).read_bytes()[:30_000])
    exp = write_experiment(folder, {"data": {"path": "corpus.txt", "max_bytes": 30_000},
                                    "train": {"batch_size": 4}, "logging": {"tensorboard": True},
                                    "sweep": {"grid": {"model.connection": ["mhc"]}}})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "mhc_lab.launch.torchrun", str(exp), "--out", str(tmp_path / "ddp")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (run_dir,) = (tmp_path / "ddp" / "tiny" / "runs").iterdir()
    assert len(list((run_dir / "tb").glob("events.out.tfevents.*"))) == 1
    assert tensorboard_scalars(run_dir / "tb")["train/loss"] == list(range(STEPS))


@needs_tensorboard
def test_submitted_jobs_log_where_they_train(tmp_path):
    pytest.importorskip("submitit")
    exp = write_experiment(tmp_path, {"logging": {"tensorboard": True}, "launcher": {"poll_s": 0.1},
                                      "sweep": {"grid": {"model.connection": ["hc"]}}})
    result = cli("run", exp, "--out", tmp_path / "out", "--launcher", "submitit-local")
    assert result.exit_code == 0, result.output
    (run_dir,) = (tmp_path / "out" / "tiny" / "runs").iterdir()
    assert tensorboard_scalars(run_dir / "tb")["train/loss"] == list(range(STEPS))


# -- failures and refusals (no optional package needed) --------------------------------------


class _Recorder(MetricLogger):
    label = "recorder"

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def start(self, step): self.calls.append(("start", step))
    def log_step(self, record): self.calls.append(("step", record["step"]))
    def log_probe(self, record): self.calls.append(("probe", record["step"]))
    def finish(self, summary): self.calls.append(("finish", summary and summary["status"]))


class _Breaks(_Recorder):
    """A backend whose disk fills up at the probe of step 2."""

    label = "Broken"

    def log_probe(self, record):
        if record["step"] == 2:
            raise OSError(28, "No space left on device")
        super().log_probe(record)


def test_a_backend_failing_mid_run_is_reported_once_and_the_run_is_intact(tmp_path, monkeypatch):
    exp = write_experiment(tmp_path, {"sweep": {"grid": {"model.connection": ["hc"]}}})
    assert cli("run", exp, "--out", tmp_path / "plain").exit_code == 0
    healthy, broken = _Recorder(), _Breaks()
    monkeypatch.setattr(runner, "open_logger", lambda *args: LoggerSet([broken, healthy], "hc-run"))
    result = cli("run", exp, "--out", tmp_path / "logged")
    assert result.exit_code == 0, result.output
    err = " ".join(result.output.split())
    assert err.count("Broken logging stopped") == 1 and "No space left on device" in err
    assert ("step", 3) not in broken.calls and ("finish", None) in broken.calls  # dropped, released
    assert healthy.calls[0] == ("start", 0) and healthy.calls[-1] == ("finish", "completed")
    assert [c[1] for c in healthy.calls if c[0] == "step"] == list(range(STEPS))
    assert [c[1] for c in healthy.calls if c[0] == "probe"] == PROBES
    (run_id,) = [p.name for p in (tmp_path / "plain" / "tiny" / "runs").iterdir()]
    assert run_contents(tmp_path / "logged" / "tiny" / "runs" / run_id) == run_contents(
        tmp_path / "plain" / "tiny" / "runs" / run_id)


def test_a_backend_failing_to_start_never_fails_the_run(tmp_path, monkeypatch):
    class NoServer(_Recorder):
        label = "W&B"

        def start(self, step):
            raise ConnectionError("cannot reach the server\nretrying")

    monkeypatch.setattr(runner, "open_logger", lambda *args: LoggerSet([NoServer()], "r"))
    exp = write_experiment(tmp_path, {"sweep": {"grid": {"model.connection": ["residual"]}}})
    result = cli("run", exp, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    err = " ".join(result.output.split())
    assert "W&B logging stopped for run r (ConnectionError: cannot reach the server)" in err


@pytest.mark.parametrize("key, package", [("wandb", "wandb"), ("tensorboard", "tensorboard")])
def test_a_backend_that_is_not_installed_is_refused_before_anything_is_written(tmp_path, monkeypatch, key, package):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    exp = write_experiment(tmp_path)
    result = cli("run", exp, "--out", tmp_path / "out", "--set", f"logging.{key}=true")
    assert result.exit_code == 2
    line = " ".join(result.output.split())
    assert f"logging.{key}: the {package} package is not installed" in line
    assert f'pip install -e ".[{package}]"' in line
    assert not (tmp_path / "out").exists()


def test_logging_is_in_no_run_id_and_not_in_resolved_yaml(tmp_path):
    plain = load_experiment(write_experiment(tmp_path))
    logged = load_experiment(write_experiment(
        tmp_path, {"logging": {"wandb": {"project": "p", "tags": ["a"]}, "tensorboard": True}}, name="b.yaml"))
    assert [r.run_id for r in plain.runs] == [r.run_id for r in logged.runs]
    assert dump_resolved(plain) == dump_resolved(logged) and "logging" not in dump_resolved(logged)
    assert logged.config.logging.wandb.mode == "offline"  # nothing leaves the machine unless asked


def test_logging_switches_from_the_command_line(tmp_path):
    exp = write_experiment(tmp_path)
    on = load_experiment(exp, ["logging.wandb.project=mine", "logging.tensorboard=true"])
    assert on.config.logging.wandb.project == "mine" and on.config.logging.tensorboard
    assert load_experiment(exp, ["logging.wandb=true"]).config.logging.wandb.project == "mhc-lab"
    assert load_experiment(exp, ["logging.wandb=false"]).config.logging.wandb is None
