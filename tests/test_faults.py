"""Fault injection (issue #17): kill, truncate, corrupt, unwritable, overflowing gains.

Every command must end a fault in one line naming the file and what is wrong (non-zero exit,
never a traceback), never take damaged results for finished ones, never leave a process of a
killed sweep running, and never run code from a results folder. Most tests damage a copy of a
tiny finished folder in-process; the kill tests start real processes (Linux: they find a
sweep's processes by an environment variable in /proc).
"""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from mhc_lab import launch
from mhc_lab.experiment.loader import load_experiment
from mhc_lab.store import is_locked

from .helpers import InterruptAt, cli, run_contents, write_experiment
from .results_fixtures import reseal

ROOT = Path(__file__).resolve().parents[1]
TWO = {"sweep": {"grid": {"model.connection": ["hc", "mhc"]}}}


def assert_one_line_error(result, *fragments: str, code: int | None = None) -> str:
    """The command failed with one `error:` line holding every fragment, no traceback."""
    assert result.exit_code != 0, result.output
    if code is not None:
        assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in last, (fragment, last)
    return last


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A tiny finished experiment folder (HC and mHC, 6 steps) with integrity records."""
    root = tmp_path_factory.mktemp("finished")
    exp = write_experiment(root, TWO)
    assert cli("run", exp, "--out", root / "out").exit_code == 0
    return root


def copy_finished(finished: Path, to: Path) -> tuple[Path, Path]:
    """A private copy: (its experiment file, its experiment folder)."""
    shutil.copytree(finished, to, dirs_exist_ok=True)
    return to / "exp.yaml", to / "out" / "tiny"


def runs(folder: Path) -> dict[str, Path]:
    return {p.name.split("-")[0]: p for p in sorted((folder / "runs").iterdir())}


# -- truncated and corrupted files of finished runs ----------------------------------------


@pytest.mark.parametrize("log", ["metrics.jsonl", "probes.jsonl"])
def test_a_truncated_log_is_damage_named_everywhere_and_run_trains_the_run_again(tmp_path, finished, log):
    exp, folder = copy_finished(finished, tmp_path)
    run = runs(folder)["hc"]
    before = run_contents(run)
    lines = (run / log).read_text().splitlines(keepends=True)
    (run / log).write_text("".join(lines[: len(lines) // 2]))  # cut at a line boundary: parses fine

    checked = cli("check", folder)
    assert_one_line_error(checked, f"{run / log}: {len(lines) // 2} lines, {len(lines)} when the run finished",
                          code=1)
    listed = cli("ls", folder)
    assert_one_line_error(listed, str(run / log), code=1)
    assert "damaged" in listed.output
    plotted = cli("plot", folder)
    assert_one_line_error(plotted, str(run / log), "left out", code=1)
    assert (folder / "figures" / "gain_vs_step.png").exists()  # the other run is drawn
    reported = cli("report", folder)
    assert_one_line_error(reported, str(run / log), code=1)
    assert "## Damaged runs, left out of this report" in (folder / "REPORT.md").read_text()

    again = cli("run", exp, "--out", tmp_path / "out")
    assert again.exit_code == 0, again.output
    assert f"{run.name} will be moved aside" in again.output and "1 already done" in again.output
    assert run_contents(run) == before  # trained again, to the same numbers
    (aside,) = (folder / "damaged").iterdir()
    assert aside.name.startswith(run.name) and len((aside / log).read_text().splitlines()) == len(lines) // 2
    assert cli("check", folder).exit_code == 0


def test_check_repair_moves_damaged_runs_aside_and_never_deletes(tmp_path, finished):
    exp, folder = copy_finished(finished, tmp_path)
    run = runs(folder)["mhc"]
    with open(run / "hres.npz", "r+b") as f:  # one flipped byte in place: same size, other sha256
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    repaired = cli("check", folder, "--repair")
    assert_one_line_error(repaired, f"{run / 'hres.npz'}: changed since the run finished", "moved aside", code=1)
    assert not run.exists() and len(list((folder / "damaged").iterdir())) == 1
    assert cli("check", folder).exit_code == 0
    assert cli("run", exp, "--out", tmp_path / "out").exit_code == 0 and run.exists()


def test_a_damaged_hres_npz_leaves_the_other_figures_and_no_half_written_file(tmp_path, finished):
    _, folder = copy_finished(finished, tmp_path)
    run = runs(folder)["hc"]
    (run / "hres.npz").write_bytes(b"PK\x03\x04 not a zip any more")
    for command in ("plot", "report"):
        result = cli(command, folder)
        assert_one_line_error(result, str(run / "hres.npz"), code=1)
    figures = sorted(p.name for p in (folder / "figures").iterdir())
    assert "mixing_matrices.png" in figures and "gain_vs_step.png" in figures  # drawn from the mHC run
    assert not [name for name in figures if name.endswith(".tmp") or name.startswith(".")]
    assert (folder / "REPORT.md").exists()


def test_an_hres_npz_holding_pickled_objects_is_refused_unread(tmp_path, finished):
    """Without an integrity record (results of an older mhc-lab) the file is parsed: never unpickled."""
    _, folder = copy_finished(finished, tmp_path)
    run = runs(folder)["hc"]
    marker = tmp_path / "pickle-ran"
    with np.load(run / "hres.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["peak"] = np.array([_Opens(marker)], dtype=object)
    np.savez(run / "hres.npz", **arrays)
    summary = json.loads((run / "summary.json").read_text())
    del summary["integrity"]
    (run / "summary.json").write_text(json.dumps(summary))
    result = cli("plot", folder)
    assert_one_line_error(result, str(run / "hres.npz"), "not a readable .npz", code=1)
    assert not marker.exists()


@pytest.mark.parametrize("damage", [b"", b'{"run_id": "x", "sta', b"[1, 2]"])
def test_a_damaged_summary_json_is_one_line_and_run_trains_the_run_again(tmp_path, finished, damage):
    exp, folder = copy_finished(finished, tmp_path)
    run = runs(folder)["mhc"]
    before = run_contents(run)
    (run / "summary.json").write_bytes(damage)
    assert_one_line_error(cli("ls", folder), f"{run / 'summary.json'}: damaged", code=1)
    assert_one_line_error(cli("check", folder), f"{run / 'summary.json'}: damaged", code=1)
    assert_one_line_error(cli("plot", folder), f"{run / 'summary.json'}: damaged", code=1)
    again = cli("run", exp, "--out", tmp_path / "out")
    assert again.exit_code == 0, again.output
    assert run_contents(run) == before


@pytest.mark.parametrize("name, content", [
    ("jobs.json", "{not json"), ("resolved.yaml", "model: [unclosed"), ("summary.csv", "\0\0\0"),
])
def test_damaged_experiment_files_are_one_line(tmp_path, finished, name, content):
    _, folder = copy_finished(finished, tmp_path)
    (folder / name).write_text(content)
    for command in ("ls", "plot"):
        result = cli(command, folder)
        if name == "summary.csv":  # derived from the runs: its damage loses nothing
            assert result.exit_code == 0, result.output
        elif command == "plot" and name == "jobs.json":  # plot never reads jobs.json
            assert result.exit_code == 0, result.output
        elif command == "ls" and name == "resolved.yaml":  # ls never reads resolved.yaml
            assert result.exit_code == 0, result.output
        else:
            assert_one_line_error(result, str(folder / name))


# -- checkpoints: damaged, or carrying code ------------------------------------------------


class _Opens:
    """Unpickling it opens (creates) a file: what a crafted checkpoint or array could do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return builtins.open, (str(self.path), "w")


@pytest.fixture(scope="module")
def whole_hc(tmp_path_factory) -> Path:
    """The HC run of the tiny experiment, trained without interruption."""
    root = tmp_path_factory.mktemp("whole")
    exp = write_experiment(root, {"sweep": {"grid": {"model.connection": ["hc"]}}})
    assert cli("run", exp, "--out", root / "out").exit_code == 0
    (run,) = (root / "out" / "tiny" / "runs").iterdir()
    return run


def interrupted_hc(tmp_path: Path) -> tuple[Path, Path]:
    """The HC run stopped at step 5: checkpoint.pt at step 4, checkpoint.previous.pt at step 2."""
    exp = write_experiment(tmp_path, {"sweep": {"grid": {"model.connection": ["hc"]}}})
    loaded = load_experiment(exp)
    with pytest.raises(KeyboardInterrupt):
        with launch.open_store(loaded, tmp_path / "out") as store:
            launch.run_sweep(loaded, store, InterruptAt(5))
    run = tmp_path / "out" / "tiny" / "runs" / loaded.runs[0].run_id
    assert (run / "checkpoint.pt").exists() and (run / "checkpoint.previous.pt").exists()
    return exp, run


def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, whole_hc):
    exp, run = interrupted_hc(tmp_path)
    (run / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes()[:300])
    result = cli("run", exp, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert f"{run / 'checkpoint.pt'}: unreadable" in result.output
    assert f"resuming {run.name} from step 2 (checkpoint.previous.pt)" in result.output
    assert run_contents(run) == run_contents(whole_hc)
    assert not list(run.glob("checkpoint*"))


def test_with_no_readable_checkpoint_the_run_starts_afresh(tmp_path, whole_hc):
    exp, run = interrupted_hc(tmp_path)
    (run / "checkpoint.pt").write_bytes(b"garbage")
    (run / "checkpoint.previous.pt").write_bytes(b"")
    result = cli("run", exp, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert f"starting {run.name} afresh" in result.output
    assert run_contents(run) == run_contents(whole_hc)


def test_a_checkpoint_carrying_a_pickled_callable_is_refused_and_the_run_restarts(tmp_path, whole_hc):
    exp, run = interrupted_hc(tmp_path)
    marker = tmp_path / "code-ran"
    payload = torch.load(run / "checkpoint.pt", weights_only=True)
    payload["state"]["first_loss"] = _Opens(marker)
    buf = io.BytesIO()
    torch.save(payload, buf)
    (run / "checkpoint.pt").write_bytes(buf.getvalue())
    (run / "checkpoint.previous.pt").unlink()
    result = cli("run", exp, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert not marker.exists()
    lines = [line for line in result.output.splitlines() if "refused" in line]
    assert len(lines) == 1 and "pickled Python object (io.open)" in lines[0]  # builtins.open is io.open
    assert f"starting {run.name} afresh" in lines[0]
    assert run_contents(run) == run_contents(whole_hc)


def test_resuming_says_from_which_step(tmp_path, whole_hc):
    exp, run = interrupted_hc(tmp_path)
    result = cli("run", exp, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert f"resuming {run.name} from step 4" in result.output
    assert run_contents(run) == run_contents(whole_hc)


# -- folders that cannot be written ---------------------------------------------------------


@contextmanager
def unwritable(*folders: Path):
    """Make folders unwritable for this process: chmod for a normal user; as root (which
    ignores modes) the immutable attribute, or skip where neither stops a write."""
    if os.geteuid() != 0:
        modes = [f.stat().st_mode for f in folders]
        for f in folders:
            f.chmod(0o555)
        undo = lambda: [f.chmod(m) for f, m in zip(folders, modes)]  # noqa: E731
    else:
        chattr = shutil.which("chattr")
        done = chattr and subprocess.run([chattr, "+i", *map(str, folders)], capture_output=True).returncode == 0
        undo = lambda: chattr and subprocess.run([chattr, "-i", *map(str, folders)], capture_output=True)  # noqa: E731
        if not done:
            undo()
            pytest.skip("running as root, which ignores file modes, and chattr +i is not available here")
    try:
        try:
            (folders[0] / ".write-probe").write_text("x")
        except OSError:
            pass
        else:
            (folders[0] / ".write-probe").unlink()
            pytest.skip("this filesystem lets the folder be written anyway")
        yield
    finally:
        undo()


def test_run_on_an_unwritable_folder(tmp_path, finished):
    exp, folder = copy_finished(finished, tmp_path)
    out = tmp_path / "out"
    (out / ".tiny.lock").unlink(missing_ok=True)
    stamp = (folder / "summary.csv").stat().st_mtime_ns
    with unwritable(out, folder):
        done = cli("run", exp, "--out", out)  # every run done: nothing to write, no lock needed
        assert done.exit_code == 0, done.output
        assert "2 already done" in done.output
        grown = write_experiment(tmp_path, {"sweep": {"grid": {"model.connection": ["hc", "mhc", "residual"]}}},
                                 "grown.yaml")
        for args in ([], ["--dry-run"]):
            result = cli("run", grown, "--out", out, *args)
            assert_one_line_error(result, "not writable", "choose another --out", code=2)
    assert (folder / "summary.csv").stat().st_mtime_ns == stamp
    assert not (out / ".tiny.lock").exists() and len(list((folder / "runs").iterdir())) == 2


def test_plot_and_report_on_an_unwritable_folder(tmp_path, finished):
    _, folder = copy_finished(finished, tmp_path)
    with unwritable(folder):
        assert_one_line_error(cli("plot", folder), f"{folder}: not writable", "--out", code=2)
        assert_one_line_error(cli("report", folder), f"{folder}: not writable", "REPORT.md", code=2)
        drawn = cli("plot", folder, "--out", tmp_path / "figures")
        assert drawn.exit_code == 0, drawn.output
    assert not (folder / "figures").exists() and not (folder / "REPORT.md").exists()


# -- overflowing gains, and a figure that fails ---------------------------------------------


def _overflow(value):
    """Every number of a probe record's gains as the string JSON holds for an overflow."""
    if isinstance(value, dict):
        return {k: _overflow(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_overflow(v) for v in value]
    return "inf" if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def test_an_overflowed_gain_is_drawn_and_reported(tmp_path, finished):
    _, folder = copy_finished(finished, tmp_path)
    run = runs(folder)["mhc"]  # what sinkhorn_iters: 0 at a high learning rate produces
    probes = [json.loads(line) for line in (run / "probes.jsonl").read_text().splitlines()]
    for probe in probes[1:]:
        for key in ("single", "composite", "headline"):
            probe[key] = _overflow(probe[key])
    (run / "probes.jsonl").write_text("".join(json.dumps(p) + "\n" for p in probes))
    summary = json.loads((run / "summary.json").read_text())
    summary.update(max_gain_fwd="inf", max_gain_bwd="inf", max_gain_step=probes[1]["step"])
    (run / "summary.json").write_text(json.dumps(summary))
    reseal(run)
    plotted = cli("plot", folder)
    assert plotted.exit_code == 0, plotted.output
    for stem in ("gain_vs_step", "gain_by_layer", "loss_and_grad_norm", "mixing_matrices"):
        assert (folder / "figures" / f"{stem}.png").exists(), stem
    reported = cli("report", folder)
    assert reported.exit_code == 0, reported.output
    assert "inf" in (folder / "REPORT.md").read_text()


def test_one_failing_figure_never_stops_the_others_or_the_report(tmp_path, finished, monkeypatch):
    from mhc_lab.analysis import plots

    def boom(view):
        raise RuntimeError("boom")

    monkeypatch.setattr(plots, "FIGURES", (("boom", boom), *plots.FIGURES))
    _, folder = copy_finished(finished, tmp_path)
    assert_one_line_error(cli("plot", folder), "figure boom: RuntimeError: boom", code=1)
    assert (folder / "figures" / "gain_vs_step.png").exists()
    assert_one_line_error(cli("report", folder), "figure boom: RuntimeError: boom", code=1)
    assert "- boom: RuntimeError: boom" in (folder / "REPORT.md").read_text()


# -- killed sweeps: no orphaned process, the lock held while one lives, resume --------------

LONG = {"data": {"path": "corpus.txt", "max_bytes": 30_000}, "train": {"steps": 150}, "probe": {"every": 25}, **TWO}


def long_experiment(folder: Path) -> Path:
    """Two runs long enough to be killed mid-run; a 30 KB corpus keeps each process's start short."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.txt").write_bytes(Path(os.__file__).read_bytes()[:30_000])
    return write_experiment(folder, LONG)


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("long")
    assert cli("run", long_experiment(folder), "--out", folder / "out").exit_code == 0
    return folder / "out" / "tiny"


def sweep_pids(tag: str) -> dict[int, str]:
    """The live (not zombie) processes whose environment carries MHC_TEST_TAG=tag: pid -> command."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if f"MHC_TEST_TAG={tag}".encode() not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(bytes(1), b" ")[:90].decode()
        except OSError:
            continue
    return found


def sweep_processes(tag: str) -> list[str]:
    return [f"{pid}: {command}" for pid, command in sweep_pids(tag).items()]


@pytest.fixture
def start(tmp_path):
    """Starts a command in its own session, its processes tagged for sweep_processes; at the
    end of the test any of them still running (a failure) is killed."""
    if not sys.platform.startswith("linux"):
        pytest.skip("finds a sweep's processes through /proc (Linux)")
    tags = []

    def start(args: list[str]) -> tuple[subprocess.Popen, str]:
        tag = uuid.uuid4().hex
        tags.append(tag)
        env = {**os.environ, "MHC_TEST_TAG": tag, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        with open(tmp_path / "sweep.log", "w") as log:
            return subprocess.Popen(args, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT), tag

    yield start
    for tag in tags:
        for pid in sweep_pids(tag):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def wait_for(path_glob: Path, pattern: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not list(path_glob.glob(pattern)):
        assert proc.poll() is None, f"ended early ({proc.returncode}): {log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"no {pattern} after {timeout} s: {log.read_text()[-2000:]}"
        time.sleep(0.02)


def wait_until_gone(tag: str, seconds: float, lock: Path | None = None) -> None:
    """Every process of the sweep ends within `seconds`; the folder lock is never free while
    one that can write under it lives (all but multiprocessing's resource tracker, which only
    cleans up semaphores once the last worker is gone)."""
    deadline = time.monotonic() + seconds
    while True:
        alive = sweep_processes(tag)
        if lock is not None and lock.exists() and not is_locked(lock):
            still = [p for p in sweep_processes(tag) if "resource_tracker" not in p]
            assert not still, f"the folder lock was free while these still ran: {still}"
        # A process that is exiting has already dropped its memory (its environment reads empty,
        # so it is no longer found) but not yet its files: the lock frees a moment later.
        if not alive and (lock is None or not is_locked(lock)):
            return
        assert time.monotonic() < deadline, f"still running {seconds} s after the kill: {alive or 'the lock holder'}"
        time.sleep(0.05)


def wait_until_free(lock: Path, seconds: float) -> None:
    """The folder lock is released within `seconds`."""
    deadline = time.monotonic() + seconds
    while is_locked(lock):
        assert time.monotonic() < deadline, f"{lock} still held {seconds} s after the kill"
        time.sleep(0.05)


CLI = [sys.executable, "-c", "from mhc_lab.cli import app; app()"]


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killing_a_two_worker_sweep_leaves_no_process_and_the_rerun_resumes(tmp_path, long_reference, start, how):
    exp = long_experiment(tmp_path)
    proc, tag = start([*CLI, "run", str(exp), "--out", str(tmp_path / "out"), "--workers", "2"])
    wait_for(tmp_path / "out" / "tiny" / "runs", "*/checkpoint.pt", proc, tmp_path / "sweep.log")
    os.kill(proc.pid, how)
    proc.wait(timeout=60)
    wait_until_gone(tag, seconds=10, lock=tmp_path / "out" / ".tiny.lock")
    if how == signal.SIGTERM:
        assert proc.returncode == 143 and "terminated" in (tmp_path / "sweep.log").read_text()
    again = cli("run", exp, "--out", tmp_path / "out")  # resumes the same in one process
    assert again.exit_code == 0, again.output
    for run in (long_reference / "runs").iterdir():
        assert run_contents(tmp_path / "out" / "tiny" / "runs" / run.name) == run_contents(run), run.name


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-4 * max(abs(a), abs(b)) + 1e-6


def test_killing_torchrun_leaves_no_rank_and_the_run_resumes(tmp_path, long_reference, start):
    exp = long_experiment(tmp_path)
    hc = load_experiment(exp).runs[0]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "mhc_lab.launch.torchrun", str(exp), "--out", str(tmp_path / "out"), "--run-id", hc.run_id]
    proc, tag = start(command)
    wait_for(tmp_path / "out" / "tiny" / "runs", "*/checkpoint.pt", proc, tmp_path / "sweep.log")
    os.kill(proc.pid, signal.SIGKILL)  # torchrun's agent: the ranks must not train on without it
    proc.wait(timeout=60)
    wait_until_gone(tag, seconds=10)
    # Only rank 0 holds the lock, and the other rank may outlive it by a poll (it writes nothing),
    # so the lock is awaited on its own: an exiting rank 0 is gone from /proc before its files.
    wait_until_free(tmp_path / "out" / ".tiny.lock", seconds=10)
    run = tmp_path / "out" / "tiny" / "runs" / hc.run_id
    assert not (run / "summary.json").exists(), "a rank trained the run to its end after torchrun was killed"
    again = cli("run", exp, "--out", tmp_path / "out")
    assert again.exit_code == 0, again.output
    a, b = run_contents(run), run_contents(long_reference / "runs" / hc.run_id)
    assert [m["step"] for m in a["metrics"]] == [m["step"] for m in b["metrics"]]
    assert all(_close(x["loss"], y["loss"]) for x, y in zip(a["metrics"], b["metrics"]))
    assert _close(a["summary"]["max_gain_fwd"], b["summary"]["max_gain_fwd"])


def test_killing_a_waiting_submitit_local_run_leaves_its_jobs_to_finish_alone(tmp_path, long_reference, start):
    """Submitted jobs outlive the command that waits for them, by design (as on Slurm, and
    with --no-wait); a rerun waits for them instead of training their runs a second time,
    and once they end nothing of the sweep is left running."""
    pytest.importorskip("submitit")
    exp = long_experiment(tmp_path)
    args = ["run", str(exp), "--out", str(tmp_path / "out"), "--launcher", "submitit-local", "--set", "launcher.poll_s=0.1"]
    proc, tag = start([*CLI, *args])
    wait_for(tmp_path / "out" / "tiny" / "runs", "*/checkpoint.pt", proc, tmp_path / "sweep.log")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    again = cli(*args)
    assert again.exit_code == 0, again.output
    assert "runs as submitit-local jobs" not in again.output  # nothing submitted, nor trained, twice
    wait_until_gone(tag, seconds=60)
    for run in (long_reference / "runs").iterdir():
        assert run_contents(tmp_path / "out" / "tiny" / "runs" / run.name) == run_contents(run), run.name
