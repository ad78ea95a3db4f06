"""Local parallel sweeps: several runs at once, each in its own process (`--workers N`).

The parent process keeps everything a one-worker sweep has: it holds the results folder's lock,
decides which runs are done, relays progress to the reporter and rebuilds summary.csv after
each finished run. Workers are spawned processes (a fresh interpreter: no state copied from
the parent); each trains one run at a time through `training.runner.execute_run` and writes only that
run's folder, so files, resume and failures are those of a one-worker sweep. The CPU cores are
split: every worker uses max(1, cores // workers) torch threads unless train.threads is set.
Runs start longest first (`longest_first`), so a short run, not a long one, is what trains
alone at the end of a sweep; the order changes how long a sweep takes, never a result.

Progress travels as messages on one queue: ("started" | "event" | "finished", run_id, payload).
Ctrl-C reaches the parent (workers ignore SIGINT); it sets a stop flag that every worker checks
at its next progress event, leaving the run's last checkpoint to resume from.

Workers die with the parent, whatever kills it, and each holds a copy of the parent's lock on
the results folder (lifeline.py): the folder stays locked until the last worker has exited,
so a rerun can never race a worker for the same files.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import queue
import signal
from pathlib import Path
from typing import Optional

from ..errors import MhcLabError
from ..experiment.config import RunConfig
from ..experiment.loader import Experiment
from ..experiment.sweep import PlannedRun
from ..store import ExperimentStore
from ..training.runner import execute_run
from .base import LockedLauncher, Reporter, SweepOutcome, plan
from .lifeline import InheritedFd, die_with_parent

POLL_S = 0.2  # how long the parent waits for a message before checking its workers

# A connection's step time against the residual's at the headline's shape (BENCHMARKS.md,
# round 5, idle; the exact variants 1.8-2.0x, mHC with sinkhorn_tol about twice mHC). It only
# orders runs, so a rough figure serves.
STEP_COST = {"residual": 1.0, "hc": 1.35, "mhc": 1.65, "mhc_lite": 1.9, "kromhc": 1.9, "ortho": 1.9}


class WorkerError(MhcLabError):
    """A worker process died or raised outside a run (the run itself resumes on the next try)."""

    exit_code = 1


def cpu_cores() -> int:
    """The cores this process may use (its CPU affinity where the OS tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def estimated_cost(cfg: RunConfig) -> float:
    """A run's cost in arbitrary units, for ordering only: the training steps plus the probes'
    validation passes (a forward pass, about a third of a step, per batch), each costing
    tokens x layers x d_model^2 (the sublayers' matmuls) times the connection's `STEP_COST`."""
    m, t, p = cfg.model, cfg.train, cfg.probe
    factor = STEP_COST.get(m.connection, 2.0)
    if m.connection == "mhc" and m.sinkhorn_tol is not None:
        factor *= 2.0
    steps = t.steps + (t.steps // p.every + 1) * p.val_batches / 3
    return steps * t.batch_size * t.seq_len * m.layers * m.d_model**2 * factor


def longest_first(runs: list[PlannedRun]) -> list[PlannedRun]:
    """`runs` by `estimated_cost`, largest first; equal costs keep the sweep's order. With N
    workers this is the longest-processing-time-first schedule: at the headline (9 runs, 2
    workers) an mHC run no longer trains alone at the end (BENCHMARKS.md, round 6)."""
    return sorted(runs, key=lambda run: -estimated_cost(run.config))


# -- in the worker processes ---------------------------------------------------------------

_messages = None  # the queue to the parent
_stop = None  # set by the parent: stop at the next progress event
_lock = None  # the parent's folder lock, held open until this worker exits


def _init_worker(messages, stop, threads: int, parent_pid: int, lock: Optional[InheritedFd]) -> None:
    global _messages, _stop, _lock
    die_with_parent(parent_pid, kernel_signal=True)  # the pool's thread lives as long as the pool
    _messages, _stop, _lock = messages, stop, lock
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and sets `stop`
    import torch

    torch.set_num_threads(threads)  # train.threads, when set, wins (train.Trainer sets it)


def _train_one(exp: Experiment, run: PlannedRun, root: str) -> None:
    if _stop.is_set():
        return

    def progress(event: dict) -> None:
        if _stop.is_set():
            raise KeyboardInterrupt  # not caught by execute_run: no summary, the checkpoint stays
        _messages.put(("event", run.run_id, event))

    _messages.put(("started", run.run_id, None))
    try:
        summary = execute_run(exp, run, ExperimentStore(Path(root)).run(run.run_id), progress)
    except KeyboardInterrupt:
        return
    _messages.put(("finished", run.run_id, summary))


# -- in the parent -------------------------------------------------------------------------


class WorkersLauncher(LockedLauncher):
    """`launcher: {kind: local, workers: N}` (`--workers N`): N runs train at once, each in its
    own spawned process; same files, same outcome as the serial launcher."""

    def __init__(self, workers: int = 2) -> None:
        self.workers = workers

    def execute(
        self, exp: Experiment, store: ExperimentStore, reporter: Reporter, only: Optional[set[str]] = None
    ) -> SweepOutcome:
        runs, done, busy = plan(exp, store, only)
        reporter.sweep_started(runs, done)
        all_ids = [r.run_id for r in exp.runs]
        summaries = {rid: store.run(rid).read_summary() for rid in done}
        todo = longest_first([r for r in runs if r.run_id not in done])
        if todo:
            n_workers = min(self.workers, len(todo))
            ctx = mp.get_context("spawn")
            messages, stop = ctx.Queue(), ctx.Event()
            threads = max(1, cpu_cores() // n_workers)
            lock = InheritedFd(store.lock_fd) if store.lock_fd is not None else None
            initargs = (messages, stop, threads, os.getpid(), lock)
            with cf.ProcessPoolExecutor(n_workers, mp_context=ctx, initializer=_init_worker, initargs=initargs) as pool:
                futures = {pool.submit(_train_one, exp, run, str(store.root)): run for run in todo}
                try:
                    _relay(messages, futures, runs, summaries, store, all_ids, reporter)
                except BaseException:
                    stop.set()  # running workers stop at their next step; queued runs never start
                    for future in futures:
                        future.cancel()
                    raise
        store.write_summary_csv(all_ids)
        return SweepOutcome(
            summaries=[summaries[r.run_id] for r in runs if r.run_id in summaries],
            skipped=len(done),
            in_flight=busy,
        )


def _relay(messages, futures, runs, summaries, store, all_ids, reporter) -> None:
    """Pass the workers' messages to the reporter until every submitted run has finished."""
    by_id = {r.run_id: r for r in runs}
    index = {r.run_id: i for i, r in enumerate(runs)}
    remaining = {run.run_id for run in futures.values()}
    while remaining:
        try:
            kind, run_id, payload = messages.get(timeout=POLL_S)
        except queue.Empty:
            _check_workers(futures, remaining)
            continue
        run = by_id[run_id]
        if kind == "started":
            reporter.run_started(run, index[run_id])
        elif kind == "event":
            reporter.run_event(run, payload)
        elif kind == "finished":
            summaries[run_id] = payload
            remaining.discard(run_id)
            store.write_summary_csv(all_ids)
            reporter.run_finished(run, payload)


def _check_workers(futures: dict, remaining: set[str]) -> None:
    """Raise if a worker died or raised: its run's "finished" message will never come."""
    for future, run in futures.items():
        if run.run_id in remaining and future.done():
            error = future.exception()
            if error is not None:
                raise WorkerError(
                    f"the worker training {run.run_id} stopped: {type(error).__name__}: {error}"
                    " (run the same command again to resume)"
                ) from error
