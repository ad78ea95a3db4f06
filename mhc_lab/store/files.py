"""The results store: the on-disk format that `run` writes and `plot`, `report`, `ls` read.

    <out>/<name>/experiment.yaml             the experiment file as given
    <out>/<name>/resolved.yaml               the validated experiment after --set overrides
    <out>/<name>/summary.csv                 one row per run (SUMMARY_COLUMNS)
    <out>/<name>/runs/<run_id>/config.yaml   the fully resolved run config
    <out>/<name>/runs/<run_id>/metrics.jsonl one JSON object per logged training step
    <out>/<name>/runs/<run_id>/probes.jsonl  one JSON object per probe (gain metric, val_loss)
    <out>/<name>/runs/<run_id>/hres.npz      H_res [layers, tokens, n, n] at the peak and last probe
    <out>/<name>/runs/<run_id>/summary.json  the run's row plus environment and details
    <out>/<name>/runs/<run_id>/checkpoint.pt while a run is unfinished (deleted at its end), with
                                             checkpoint.previous.pt, the one before it
    <out>/<name>/runs/<run_id>/tb/, wandb/   live logging, when the `logging` section turns it on
    <out>/<name>/.locks/<run_id>.lock        held by the process training that run (`ls`: training)
    <out>/<name>/damaged/<run_id>.<time>/    runs that failed their integrity check, moved aside
    <out>/<name>/jobs.json                   submitit jobs: run_id -> job id, cluster, log folder
    <out>/<name>/jobs/                       submitit's job files and logs (launcher.log_folder)

Whole files are written atomically (temp file + rename); JSONL lines are appended and flushed.
A run is finished exactly when its summary.json exists; it records what the run wrote (line
counts and sha256 per file, integrity.py), so damage found later is named, never read as a
result. summary.csv is rebuilt from the runs' summary.json files under a lock
(`<out>/.<name>.summary.lock`), so concurrent jobs cannot lose rows. Every file that cannot be
read, or is damaged, is a one-line StoreError naming it (docs/results-format.md).
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import math
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from ..errors import MhcLabError

SUMMARY_COLUMNS: tuple[str, ...] = (
    "run_id", "connection", "depth", "layers", "d_model", "n_streams", "sinkhorn_iters", "sinkhorn_tol",
    "lr", "seed", "n_params", "status", "steps_done", "final_loss", "final_val_loss",
    "max_gain_fwd", "max_gain_bwd", "max_gain_step", "max_gain_layer",
    "max_gain_fwd_inf", "max_gain_bwd_inf", "final_gain_fwd", "final_gain_bwd", "max_signal_growth",
    "diverged_step", "wall_s", "tokens_per_s",
)
FINISHED = ("completed", "diverged", "failed")


class StoreError(MhcLabError):
    """A results folder that is missing, malformed, unwritable or in use."""


class DamagedResults(StoreError):
    """A file of a finished run that cannot be read back, or differs from what the run wrote
    (exit code 1: the command did what it could with the other runs)."""

    exit_code = 1


def _reason(exc: BaseException) -> str:
    """An exception as a short phrase for a one-line message."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _file_mode() -> int:
    """The mode a plain open() would give a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, _file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def to_json(obj: Any) -> str:
    """JSON with non-finite floats written as null-free strings (`"inf"`, `"nan"`)."""
    return json.dumps(_finite(obj), separators=(",", ":"))


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)  # "inf", "-inf", "nan": valid JSON, read back by `as_float`
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def as_float(value: Any) -> float:
    """Read back a number written by `to_json` (or a CSV cell); None/'' -> nan."""
    if value is None or value == "":
        return float("nan")
    return float(value)


def peak_gain(summary: dict) -> float:
    """A run's headline gain: the larger of its forward and backward peak composite gains
    (nan when the run has none, e.g. a failed run)."""
    values = [as_float(summary.get(k)) for k in ("max_gain_fwd", "max_gain_bwd")]
    values = [v for v in values if not math.isnan(v)]
    return max(values) if values else float("nan")


def read_jsonl(path: Path) -> list[dict]:
    """All complete lines of a JSONL file; a torn last line (a killed writer) is ignored."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


class JsonlWriter:
    """Appends one JSON object per line and flushes it, so a crash loses at most a line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._file.write(to_json(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Keep only the complete lines with step < max_step (used when resuming at max_step)."""
    kept = [r for r in read_jsonl(path) if r.get("step", 0) < max_step]
    atomic_write_text(path, "".join(to_json(r) + "\n" for r in kept))


class RunFiles:
    """The files of one run: `<experiment>/runs/<run_id>/`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.config = root / "config.yaml"
        self.metrics = root / "metrics.jsonl"
        self.probes = root / "probes.jsonl"
        self.hres = root / "hres.npz"
        self.summary = root / "summary.json"
        self.checkpoint = root / "checkpoint.pt"
        self.previous_checkpoint = root / "checkpoint.previous.pt"  # the one before, kept as a fallback
        self.unreadable_checkpoint = root / "checkpoint.unreadable.pt"  # one that failed to load
        self.error = root / "error.txt"
        self.lock = root.parent.parent / ".locks" / f"{root.name}.lock"  # held while a process trains it

    @property
    def run_id(self) -> str:
        return self.root.name

    def read_summary(self) -> Optional[dict]:
        """summary.json (None while the run is unfinished); DamagedResults if it cannot be read."""
        try:
            data = json.loads(self.summary.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise DamagedResults(f"{self.summary}: damaged, not readable as JSON ({_reason(exc)})") from None
        if not isinstance(data, dict) or not isinstance(data.get("status"), str):
            raise DamagedResults(f"{self.summary}: damaged, not a run summary (no `status`)")
        return data

    def write_summary(self, summary: dict) -> None:
        atomic_write_text(self.summary, json.dumps(_finite(summary), indent=2) + "\n")

    def save_hres(self, peak: np.ndarray, peak_step: int, final: np.ndarray, final_step: int) -> None:
        buf = io.BytesIO()
        np.savez_compressed(
            buf, peak=peak, final=final, peak_step=np.int64(peak_step), final_step=np.int64(final_step)
        )
        atomic_write_bytes(self.hres, buf.getvalue())

    def load_hres(self) -> dict[str, np.ndarray]:
        """hres.npz's arrays; never unpickles (allow_pickle=False): DamagedResults instead."""
        try:
            with np.load(self.hres, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except Exception as exc:  # noqa: BLE001 - zip, zlib, format and pickle errors alike
            raise DamagedResults(f"{self.hres}: damaged, not a readable .npz ({_reason(exc)})") from None
        missing = {"peak", "final", "peak_step", "final_step"} - set(arrays)
        if missing:
            raise DamagedResults(f"{self.hres}: damaged, lacks {', '.join(sorted(missing))}")
        return arrays


class ExperimentStore:
    """One experiment's results folder, `<out>/<name>/`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.runs_dir = self.root / "runs"
        self.summary_csv = self.root / "summary.csv"
        self.experiment_yaml = self.root / "experiment.yaml"
        self.resolved_yaml = self.root / "resolved.yaml"
        self.jobs_json = self.root / "jobs.json"
        self.damaged_dir = self.root / "damaged"
        # The descriptor of the folder lock when this process holds it (launch/base.py
        # open_store): launchers hand it to the processes they start, so the lock lasts
        # until the last of them has exited.
        self.lock_fd: Optional[int] = None

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def folder_lock(self) -> Path:
        """`<out>/.<name>.lock`: held by the `mhc-lab run` writing this folder (launch/base.py)."""
        return self.root.parent / f".{self.name}.lock"

    def lock_path(self, purpose: str) -> Path:
        """`<out>/.<name>.<purpose>.lock`: beside the folder, like the run lock (runner.py)."""
        return self.root.parent / f".{self.name}.{purpose}.lock"

    def exists(self) -> bool:
        return self.experiment_yaml.exists()

    def run(self, run_id: str) -> RunFiles:
        """The files of a run; its id must be a plain folder name (ids also come from files
        such as jobs.json, which must never point outside the folder)."""
        if not run_id or run_id.startswith(".") or "/" in run_id or "\\" in run_id:
            raise StoreError(f"{self.root}: {run_id!r} is not a run id")
        return RunFiles(self.runs_dir / run_id)

    def run_ids(self) -> list[str]:
        if not self.runs_dir.is_dir():
            return []
        return sorted(p.name for p in self.runs_dir.iterdir() if p.is_dir())

    def summaries(self) -> list[dict]:
        """Every finished run's readable summary.json, in summary.csv order when it exists
        (integrity.check_store names the unreadable ones)."""
        try:
            order = [row.get("run_id") for row in self.read_summary_csv()] if self.summary_csv.exists() else []
        except (OSError, ValueError, csv.Error):  # summary.csv is derived: its order is a nicety
            order = []
        found = {rid: s for rid in self.run_ids() if (s := _readable_summary(self.run(rid)))}
        ordered = [found.pop(rid) for rid in order if rid in found]
        return ordered + [found[rid] for rid in sorted(found)]

    def write_summary_csv(self, run_ids: list[str]) -> None:
        """summary.csv from every finished run of the folder: those of `run_ids` in that order,
        then any others (a sweep that grew while an older job was still training) by id.

        Read and write happen under a blocking lock: processes that finish runs at the same time
        (workers, Slurm jobs) each rebuild it after their own summary.json is written, and the
        last rebuild sees every row."""
        with blocking_lock(self.lock_path("summary")):
            ordered = list(dict.fromkeys(run_ids))
            ordered += sorted(set(self.run_ids()) - set(ordered))
            rows = [s for rid in ordered if (s := _readable_summary(self.run(rid)))]
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: _csv_cell(row.get(k)) for k in SUMMARY_COLUMNS})
            atomic_write_text(self.summary_csv, buf.getvalue())

    def read_summary_csv(self) -> list[dict]:
        with open(self.summary_csv, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))


def _readable_summary(files: RunFiles) -> Optional[dict]:
    try:
        return files.read_summary()
    except DamagedResults:  # not a row: `mhc-lab check` names it, `run` retrains it
        return None


IN_USE = "another `mhc-lab run` is using this results folder; wait for it to finish or choose another --out"


@contextmanager
def exclusive_lock(lock_path: Path, folder: Path, in_use: str = IN_USE, tries: int = 1) -> Iterator[int]:
    """Hold an exclusive lock on `lock_path` and yield its file descriptor; a second holder
    refuses (StoreError `<folder>: <in_use>`) after `tries` attempts 50 ms apart.

    The lock belongs to the open file, not to this process: a process started with a copy of
    the descriptor (launch/workers.py) keeps it held until it exits too. So it is never
    unlocked explicitly, only closed."""
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_path, "a")  # never truncates: a reader may hold it (is_locked)
    except OSError as exc:
        raise StoreError(f"{lock_path}: cannot create the lock file ({_reason(exc)}); "
                         f"{folder.parent if folder != lock_path.parent else folder} must be writable") from None
    with handle:
        for attempt in range(tries):
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == tries - 1:
                    raise StoreError(f"{folder}: {in_use}") from None
                time.sleep(0.05)
        yield handle.fileno()


def is_locked(lock_path: Path) -> bool:
    """Whether some process holds the lock on `lock_path` now (writes nothing; a lock file that
    does not exist is not held)."""
    try:
        handle = open(lock_path, "rb")
    except OSError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def unwritable(path: Path) -> Optional[str]:
    """Why files cannot be created in folder `path` (or in the nearest existing folder above
    it, where it would be created), or None. Asks the OS (access(2)), so it writes nothing
    and knows read-only mounts and immutable folders, which root cannot write either."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        return f"{existing}: exists and is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing}: not writable"
    return None


@contextmanager
def blocking_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path`, waiting for other holders (short critical sections)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    return value


def open_results(path: Path | str) -> ExperimentStore:
    """An existing experiment results folder, or StoreError with one clear line."""
    store = ExperimentStore(Path(path))
    if not store.root.is_dir():
        raise StoreError(f"{store.root}: no such results folder")
    if not store.exists() or not store.runs_dir.is_dir():
        raise StoreError(
            f"{store.root}: not an mhc-lab results folder (no experiment.yaml and runs/); "
            "give a folder written by `mhc-lab run`, e.g. results/smoke"
        )
    return store


def list_experiments(out: Path | str) -> list[ExperimentStore]:
    """The experiment folders directly under `out`, most recently written first."""
    out = Path(out)
    if not out.is_dir():
        return []
    stores = [ExperimentStore(p) for p in out.iterdir() if p.is_dir() and (p / "experiment.yaml").exists()]
    return sorted(stores, key=lambda s: _latest_mtime(s), reverse=True)


def _latest_mtime(store: ExperimentStore) -> float:
    candidates = [store.experiment_yaml, store.summary_csv]
    return max((p.stat().st_mtime for p in candidates if p.exists()), default=0.0)
