"""The launcher interface: what every way of executing a sweep's runs shares.

A launcher gets a validated experiment and a results root, and trains (or submits) every run
of the sweep that is not done yet. It decides *where* runs train, never *what* they compute:
each run goes through `training.runner.execute_run`, so the files are the same whichever
launcher trained it, and switching launchers keeps every finished result.

    Launcher.run(exp, out, fresh, reporter, only) -> SweepOutcome

    LockedLauncher.run:                      the launchers whose one process holds the lock
        with open_store(...) as store:       lock the folder, check it, write the experiment
            execute(exp, store, ...)         the launcher's own part, which starts with
                plan(exp, store, only)       what is done, what to train, what a job still trains

Implementations, one file each: serial.py (one run after another), workers.py (`--workers N`
local processes), slurm.py (submitit: Slurm job arrays and `submitit-local`), all three
LockedLaunchers, and torchrun.py (runs data-parallel over the processes torchrun starts: every
rank calls `run`, and only rank 0 opens the store). Adding a launcher (Ray, a Kubernetes job
array) is one new file with one such class, plus its `launcher.kind` value in
experiment/config.py and its branch in `make_launcher`. `mhc_lab.launch.make_launcher` picks one from the
experiment's `launcher` section.
"""

from __future__ import annotations

import shutil
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Protocol

from ..experiment.loader import Experiment, dump_resolved
from ..experiment.sweep import PlannedRun
from ..store import (
    ExperimentStore, RunCheck, StoreError, atomic_write_text, check_store, exclusive_lock, move_aside, unwritable,
)
from ..training.loggers import require_installed
from ..training.runner import plan_sweep
from .inflight import live_job_runs, read_jobs


class Reporter(Protocol):
    """Receives progress; the CLI renders it (rich display or plain lines, progress.py)."""

    def sweep_started(self, runs: list[PlannedRun], done: set[str]) -> None: ...
    def run_started(self, run: PlannedRun, index: int) -> None: ...
    def run_event(self, run: PlannedRun, event: dict) -> None: ...
    def run_finished(self, run: PlannedRun, summary: dict) -> None: ...


class SilentReporter:
    """A reporter that says nothing (library use, tests)."""

    def sweep_started(self, runs: list[PlannedRun], done: set[str]) -> None: ...
    def run_started(self, run: PlannedRun, index: int) -> None: ...
    def run_event(self, run: PlannedRun, event: dict) -> None: ...
    def run_finished(self, run: PlannedRun, summary: dict) -> None: ...


@dataclass
class SweepOutcome:
    """What a sweep did: every planned run's summary, and how many were skipped."""

    summaries: list[dict] = field(default_factory=list)
    skipped: int = 0
    in_flight: list[str] = field(default_factory=list)  # runs a submitted job is still training
    submitted: dict[str, str] = field(default_factory=dict)  # run_id -> job id (slurm.py)
    lost: list[str] = field(default_factory=list)  # jobs that ended without a result, one line each

    def count(self, status: str) -> int:
        return sum(1 for s in self.summaries if s.get("status") == status)


class Launcher(ABC):
    """One way of executing the pending runs of a sweep (see the module docstring)."""

    @abstractmethod
    def run(
        self,
        exp: Experiment,
        out: Path,
        fresh: bool = False,
        reporter: Optional[Reporter] = None,
        only: Optional[set[str]] = None,
    ) -> SweepOutcome:
        """Train (or submit) every run of the sweep (or of `only`) that is not done yet into
        `<out>/<name>`; `fresh` moves an existing folder aside first."""


class LockedLauncher(Launcher):
    """A launcher whose one process holds the results folder's lock for the whole sweep and
    plans it (serial, workers, submitit); it implements only `execute`."""

    def run(
        self,
        exp: Experiment,
        out: Path,
        fresh: bool = False,
        reporter: Optional[Reporter] = None,
        only: Optional[set[str]] = None,
    ) -> SweepOutcome:
        problem = None if fresh else read_only(exp, Path(out))
        if problem is not None:  # nothing can be written: fine only if nothing is left to do
            return finished_outcome(exp, ExperimentStore(Path(out) / exp.config.name), only, problem)
        with open_store(exp, out, fresh) as store:
            return self.execute(exp, store, reporter or SilentReporter(), only)

    @abstractmethod
    def execute(
        self, exp: Experiment, store: ExperimentStore, reporter: Reporter, only: Optional[set[str]] = None
    ) -> SweepOutcome:
        """Train (or submit) the pending runs into an open, locked store."""


def plan(
    exp: Experiment, store: ExperimentStore, only: Optional[set[str]] = None
) -> tuple[list[PlannedRun], set[str], list[str]]:
    """`training.runner.plan_sweep`, leaving out the runs a submitted job may still train."""
    busy = frozenset(live_job_runs(store)) if store.jobs_json.exists() else frozenset()
    return plan_sweep(exp, store, only, busy)


@contextmanager
def open_store(exp: Experiment, out: Path, fresh: bool = False) -> Iterator[ExperimentStore]:
    """Lock `<out>/<name>`, move it aside if `fresh`, check it holds this experiment, move its
    damaged runs aside (they are trained again), and write experiment.yaml / resolved.yaml.
    Yields the store while holding the lock.

    A folder whose runs (finished, started or submitted as jobs) all belong to this sweep is
    this experiment, even if its resolved.yaml differs (more grid values or seeds, another
    description): the new runs join the old."""
    out = Path(out)
    store = ExperimentStore(out / exp.config.name)
    require_installed(exp.config.logging)  # an enabled W&B / TensorBoard must be there first
    with lock_folder(out, exp.config.name) as lock_fd:
        store.lock_fd = lock_fd
        if fresh and store.root.exists():
            if store.jobs_json.exists() and live_job_runs(store):
                raise StoreError(
                    f"{store.root}: submitted jobs are still training runs of this folder; "
                    "wait for them (mhc-lab ls) or cancel them before --fresh"
                )
            aside = store.root.with_name(f"{store.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            shutil.move(str(store.root), str(aside))
        problem = foreign_runs(exp, store)
        if problem is not None:
            raise problem
        for check in damaged_runs(exp, store):  # retrained below: their files go aside, never lost
            move_aside(store, check.run_id)
        atomic_write_text(store.experiment_yaml, exp.text)
        atomic_write_text(store.resolved_yaml, dump_resolved(exp))
        yield store


def foreign_runs(exp: Experiment, store: ExperimentStore) -> Optional[StoreError]:
    """The refusal when `store` holds runs (finished, started or submitted) of another
    version of the experiment; None when it holds this one (or nothing)."""
    if not store.resolved_yaml.exists() or store.resolved_yaml.read_text(encoding="utf-8") == dump_resolved(exp):
        return None
    present = set(store.run_ids()) | set(read_jobs(store))  # a queued job has no folder yet
    foreign = sorted(present - {r.run_id for r in exp.runs})
    if not foreign:
        # Every run already there (or submitted) belongs to this sweep: a grown grid or an
        # edited description. Run ids hash every field that can change a run's numbers.
        return None
    return StoreError(
        f"{store.root}: holds results of a different version of experiment "
        f"{exp.config.name!r} ({len(foreign)} run(s) not in this sweep, e.g. "
        f"{foreign[0]}); rerun with --fresh to move them aside, or change `name` or --out"
    )


def damaged_runs(exp: Experiment, store: ExperimentStore) -> list[RunCheck]:
    """The finished runs of this sweep whose files fail their integrity check (store/integrity.py)."""
    return [c for c in check_store(store, [r.run_id for r in exp.runs]) if c.damaged]


def read_only(exp: Experiment, out: Path) -> Optional[str]:
    """Why nothing can be written for `exp` under `out` (the lock beside the folder, the
    folder, its runs), or None."""
    root = out / exp.config.name
    for folder in (out, root, root / "runs"):
        problem = unwritable(folder)
        if problem is not None:
            return problem
    return None


def finished_outcome(exp: Experiment, store: ExperimentStore, only: Optional[set[str]], problem: str) -> SweepOutcome:
    """The outcome of a sweep whose folder cannot be written: every run done already (read
    without taking the lock, writing nothing), or StoreError naming `problem`."""
    refusal = foreign_runs(exp, store) if store.resolved_yaml.exists() else None
    if refusal is not None:
        raise refusal
    damaged = damaged_runs(exp, store)
    if damaged:
        raise StoreError(f"{damaged[0].problem}; it cannot be moved aside and trained again: {problem}")
    runs, done, busy = plan_sweep(exp, store, only)
    todo = [r.run_id for r in runs if r.run_id not in done]
    if todo:
        raise StoreError(f"{problem}: cannot write the results of {len(todo)} run(s) still to train "
                         f"(e.g. {todo[0]}); choose another --out")
    return SweepOutcome(summaries=[store.run(r.run_id).read_summary() for r in runs],
                        skipped=len(done), in_flight=busy)


@contextmanager
def lock_folder(out: Path, name: str) -> Iterator[int]:
    """An exclusive lock on `<out>/.<name>.lock` (beside the folder, so --fresh can move it);
    yields its file descriptor (see store.exclusive_lock)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # e.g. --out names an existing file
        raise StoreError(f"{out}: cannot create the results folder: {exc.strerror}") from None
    if (out / name).exists() and not (out / name).is_dir():
        raise StoreError(f"{out / name}: exists and is not a folder; choose another --out or name")
    with exclusive_lock(out / f".{name}.lock", out / name, tries=5) as fd:  # `--dry-run` may probe it
        yield fd
