"""Plan a sweep against its results store and train one run into it.

This is what every launcher (mhc_lab/launch/) calls: `plan_sweep` says which runs of an
experiment are done and which to train, `execute_run` trains one run into its folder and
records the result. A run is done when its summary.json exists with status `completed` or
`diverged`; a `failed` run is tried again; an interrupted run resumes from its last checkpoint
(trainer.py). Whichever launcher trained a run, its files are the same.

While it trains a run, a process holds the run's lock (`<experiment>/.locks/<run_id>.lock`): a second
process refuses to train the same run, and `mhc-lab ls` tells a run training now from an
interrupted one. A finished run's summary.json records what it wrote (store/integrity.py).
"""

from __future__ import annotations

import traceback
from typing import Callable, Optional

import yaml

from ..experiment.loader import Experiment
from ..experiment.sweep import PlannedRun
from ..store import DamagedResults, ExperimentStore, RunFiles, atomic_write_text, exclusive_lock, is_locked, record
from .loggers import open_logger
from .trainer import config_columns, train_run

DONE = ("completed", "diverged")


def run_status(files: RunFiles) -> str:
    """`completed`, `diverged`, `failed`, `damaged` (an unreadable summary.json), `training`
    (a process holds the run's lock), `interrupted` (started, unfinished) or `pending`."""
    try:
        summary = files.read_summary()
    except DamagedResults:
        return "damaged"
    if summary:
        return summary["status"]
    if is_locked(files.lock):
        return "training"
    if files.checkpoint.exists() or files.previous_checkpoint.exists() or files.metrics.exists():
        return "interrupted"
    return "pending"


def plan_sweep(
    exp: Experiment, store: ExperimentStore, only: Optional[set[str]] = None, busy: frozenset[str] = frozenset()
) -> tuple[list[PlannedRun], set[str], list[str]]:
    """The runs to train now (done ones included, to be skipped), the ids of the done ones, and
    the ids left out because a submitted job may still be training them (`busy`, from
    launch/inflight.py: a run is never trained twice at once)."""
    runs = [r for r in exp.runs if only is None or r.run_id in only]
    done = {r.run_id for r in runs if run_status(store.run(r.run_id)) in DONE}
    skip = set(busy) - done
    return [r for r in runs if r.run_id not in skip], done, sorted(skip)


def execute_run(
    exp: Experiment, run: PlannedRun, files: RunFiles, progress, train: Callable[..., dict] = train_run
) -> dict:
    """Train one run into `files` with `train` (trainer.train_run, or the data-parallel trainer
    of launch/torchrun.py), holding the run's lock; an exception becomes status `failed` with
    its message. The summary records what the run wrote (its `integrity`). The experiment's
    `logging` backends (training/loggers/) mirror the run live, in this process only (rank 0
    under torchrun); a backend's failure never fails the run."""
    files.root.mkdir(parents=True, exist_ok=True)
    busy = "another process is training this run right now (mhc-lab ls shows it)"
    with exclusive_lock(files.lock, files.root, busy, tries=20):  # `ls` may probe it for an instant
        for leftover in files.root.glob(".*.tmp"):  # atomic writes of a killed process
            leftover.unlink(missing_ok=True)
        config = run.config.model_dump(mode="json")
        atomic_write_text(files.config, yaml.safe_dump(config, sort_keys=False))
        if not (files.checkpoint.exists() or files.previous_checkpoint.exists()):  # nothing to resume
            for stale in (files.metrics, files.probes, files.error, files.hres):
                stale.unlink(missing_ok=True)
        logger = open_logger(exp.config.logging, exp.config.name, run.run_id, config, run.config.model.connection, files)
        try:
            summary = train(run.config, files, exp.base_dir, progress, logger=logger)
        except Exception as exc:  # a run that raises is a result too: recorded, sweep goes on
            atomic_write_text(files.error, traceback.format_exc())
            summary = {
                **config_columns(run.run_id, run.config),
                "status": "failed",
                "reason": f"{type(exc).__name__}: {exc}".splitlines()[0],
            }
        except BaseException:  # interrupted: the checkpoint stays, and so does the W&B run
            logger.finish(None)
            raise
        summary["overrides"] = run.overrides
        summary["integrity"] = record(files)
        files.write_summary(summary)
        if summary["status"] in DONE:
            for checkpoint in (files.checkpoint, files.previous_checkpoint, files.unreadable_checkpoint):
                checkpoint.unlink(missing_ok=True)
        logger.finish({k: v for k, v in summary.items() if k != "integrity"})
    return summary
