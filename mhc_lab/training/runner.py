"""Run a validated experiment into its results folder: skip what is done, resume the rest.

A run is done when its summary.json exists with status `completed` or `diverged`; a `failed`
run is tried again. An interrupted run resumes from its last checkpoint (train.py). One
process at a time per results folder (a lock beside it); `fresh` moves an old folder aside.
Runs train one after another here, several at once with `workers` (parallel.py), as submitted
jobs (jobs.py) or data-parallel over several processes (distributed.py); all of them train a
run through `execute_run`, so the files are the same whichever way a run was trained.
"""

from __future__ import annotations

import shutil
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Protocol

import yaml

from .experiment_file import Experiment, dump_resolved
from .store import ExperimentStore, RunFiles, StoreError, atomic_write_text, exclusive_lock
from .sweep import PlannedRun
from .train import config_columns, train_run

DONE = ("completed", "diverged")


class Reporter(Protocol):
    """Receives progress; the CLI renders it (rich display or plain lines)."""

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
    submitted: dict[str, str] = field(default_factory=dict)  # run_id -> job id (jobs.py)
    lost: list[str] = field(default_factory=list)  # jobs that ended without a result, one line each

    def count(self, status: str) -> int:
        return sum(1 for s in self.summaries if s.get("status") == status)


def run_status(files: RunFiles) -> str:
    """`completed`, `diverged`, `failed`, `partial` (started, unfinished) or `pending`."""
    summary = files.read_summary()
    if summary:
        return summary["status"]
    if files.checkpoint.exists() or files.metrics.exists():
        return "partial"
    return "pending"


@contextmanager
def open_store(exp: Experiment, out: Path, fresh: bool = False) -> Iterator[ExperimentStore]:
    """Lock `<out>/<name>`, move it aside if `fresh`, check it holds this experiment, and
    write experiment.yaml / resolved.yaml. Yields the store while holding the lock.

    A folder whose runs (finished, started or submitted as jobs) all belong to this sweep is
    this experiment, even if its resolved.yaml differs (more grid values or seeds, another
    description): the new runs join the old."""
    out = Path(out)
    store = ExperimentStore(out / exp.config.name)
    with lock_folder(out, exp.config.name):
        resolved = dump_resolved(exp)
        if fresh and store.root.exists():
            if store.jobs_json.exists():
                from .jobs import live_job_runs

                if live_job_runs(store):
                    raise StoreError(
                        f"{store.root}: submitted jobs are still training runs of this folder; "
                        "wait for them (mhc-lab ls) or cancel them before --fresh"
                    )
            aside = store.root.with_name(f"{store.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            shutil.move(str(store.root), str(aside))
        if store.resolved_yaml.exists() and store.resolved_yaml.read_text(encoding="utf-8") != resolved:
            from .jobs import read_jobs

            present = set(store.run_ids()) | set(read_jobs(store))  # a queued job has no folder yet
            foreign = sorted(present - {r.run_id for r in exp.runs})
            if foreign:
                raise StoreError(
                    f"{store.root}: holds results of a different version of experiment "
                    f"{exp.config.name!r} ({len(foreign)} run(s) not in this sweep, e.g. "
                    f"{foreign[0]}); rerun with --fresh to move them aside, or change `name` or --out"
                )
            # Every run already there (or submitted) belongs to this sweep: a grown grid or an
            # edited description. Run ids hash every field that can change a run's numbers.
        atomic_write_text(store.experiment_yaml, exp.text)
        atomic_write_text(store.resolved_yaml, resolved)
        yield store


@contextmanager
def lock_folder(out: Path, name: str) -> Iterator[None]:
    """An exclusive lock on `<out>/.<name>.lock` (beside the folder, so --fresh can move it)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # e.g. --out names an existing file
        raise StoreError(f"{out}: cannot create the results folder: {exc.strerror}") from None
    if (out / name).exists() and not (out / name).is_dir():
        raise StoreError(f"{out / name}: exists and is not a folder; choose another --out or name")
    with exclusive_lock(out / f".{name}.lock", out / name):
        yield


def plan_sweep(
    exp: Experiment, store: ExperimentStore, only: Optional[set[str]] = None
) -> tuple[list[PlannedRun], set[str], list[str]]:
    """The runs to train now (done ones included, to be skipped), the ids of the done ones, and
    the ids left out because a submitted job is still training them (never train a run twice)."""
    runs = [r for r in exp.runs if only is None or r.run_id in only]
    done = {r.run_id for r in runs if run_status(store.run(r.run_id)) in DONE}
    busy: set[str] = set()
    if store.jobs_json.exists():
        from .jobs import live_job_runs

        busy = live_job_runs(store) - done
    return [r for r in runs if r.run_id not in busy], done, sorted(busy)


def run_sweep(
    exp: Experiment,
    store: ExperimentStore,
    reporter: Optional[Reporter] = None,
    only: Optional[set[str]] = None,
    workers: int = 1,
) -> SweepOutcome:
    """Train every planned run that is not done yet (or only those in `only`).

    With `workers` > 1, that many runs train at once in separate processes (parallel.py);
    files, resume and progress events are the same as with one."""
    if workers > 1:
        from .parallel import run_sweep_parallel

        return run_sweep_parallel(exp, store, reporter, only, workers)
    reporter = reporter or SilentReporter()
    runs, done, busy = plan_sweep(exp, store, only)
    reporter.sweep_started(runs, done)
    outcome = SweepOutcome(in_flight=busy)
    all_ids = [r.run_id for r in exp.runs]
    for index, run in enumerate(runs):
        files = store.run(run.run_id)
        if run.run_id in done:
            outcome.summaries.append(files.read_summary())
            outcome.skipped += 1
            continue
        reporter.run_started(run, index)
        summary = execute_run(exp, run, files, lambda event, run=run: reporter.run_event(run, event))
        outcome.summaries.append(summary)
        store.write_summary_csv(all_ids)
        reporter.run_finished(run, summary)
    store.write_summary_csv(all_ids)
    return outcome


def execute_run(
    exp: Experiment, run: PlannedRun, files: RunFiles, progress, train: Callable[..., dict] = train_run
) -> dict:
    """Train one run into `files` with `train` (train.train_run, or the data-parallel trainer of
    distributed.py); an exception becomes status `failed` with its message."""
    files.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(files.config, yaml.safe_dump(run.config.model_dump(mode="json"), sort_keys=False))
    if not files.checkpoint.exists():  # nothing to resume: start the logs afresh
        for stale in (files.metrics, files.probes, files.error, files.hres):
            stale.unlink(missing_ok=True)
    try:
        summary = train(run.config, files, exp.base_dir, progress)
    except Exception as exc:  # a run that raises is a result too: recorded, sweep goes on
        atomic_write_text(files.error, traceback.format_exc())
        summary = {
            **config_columns(run.run_id, run.config),
            "status": "failed",
            "reason": f"{type(exc).__name__}: {exc}".splitlines()[0],
        }
    summary["overrides"] = run.overrides
    files.write_summary(summary)
    if summary["status"] in DONE:
        files.checkpoint.unlink(missing_ok=True)
    return summary
