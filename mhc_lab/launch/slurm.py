"""Submitted sweeps: one job per pending run through submitit (`launcher.kind: slurm`).

`mhc-lab run FILE --launcher slurm` submits the pending runs as one Slurm job array
(submitit's `map_array`), records the job ids in <experiment>/jobs.json, then waits and shows
progress, or returns at once with --no-wait. Each job trains its run with
`training.runner.execute_run` into the same results store, so files are written atomically and
a run resumes from its checkpoint exactly as locally; summary.csv is rebuilt under a lock
(store/), so jobs finishing together cannot lose rows. A job stopped by its time limit or
preempted is requeued by submitit (`RunJob.checkpoint`) and resumes from the run's last
checkpoint.

The waiting `mhc-lab run` needs no connection to the jobs: it reads the runs' own files
(metrics.jsonl, probes.jsonl, summary.json) every launcher.poll_s seconds and asks submitit
whether each job is still queued or running (inflight.py). A run whose job is still queued or
running is never submitted or trained a second time, by any launcher. `submitit-local` runs the very same
code with submitit's local executor (each job a local process), which is how the tests
exercise this path without Slurm.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import MhcLabError
from ..experiment.loader import Experiment
from ..experiment.sweep import PlannedRun
from ..store import ExperimentStore, RunFiles, as_float, atomic_write_text, blocking_lock
from ..training.runner import execute_run
from .base import LockedLauncher, Reporter, SweepOutcome, plan
from .inflight import ALIVE, CLUSTERS, JobRecord, job_handle, job_state, read_jobs, submitit_module

# -- what a job runs -------------------------------------------------------------------------


class RunJob:
    """The callable each job runs: train one run into the results store (pickled by submitit)."""

    def __call__(self, exp: Experiment, run: PlannedRun, root: str) -> str:
        if run.config.train.threads is None:  # use the cores the scheduler gave this job
            import torch

            torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
        store = ExperimentStore(Path(root))
        summary = execute_run(exp, run, store.run(run.run_id), None)
        store.write_summary_csv([r.run_id for r in exp.runs])
        return summary["status"]

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Called by submitit at a time limit or preemption: requeue the same run; it resumes
        from its last checkpoint (log lines after it are dropped, as on any resume)."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


def record_jobs(store: ExperimentStore, records: list[JobRecord]) -> None:
    with blocking_lock(store.lock_path("jobs")):
        jobs = {rid: dataclasses.asdict(r) for rid, r in read_jobs(store).items()}
        for r in records:
            jobs[r.run_id] = {k: v for k, v in dataclasses.asdict(r).items() if k != "run_id"}
        atomic_write_text(store.jobs_json, json.dumps({"jobs": jobs}, indent=2, sort_keys=True) + "\n")


# -- submitting and waiting ------------------------------------------------------------------


def make_executor(exp: Experiment, store: ExperimentStore):
    """A submitit executor configured from the experiment's `launcher` section."""
    submitit = submitit_module()
    launcher = exp.config.launcher
    folder = job_folder(exp, store)
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=CLUSTERS[launcher.kind])
        executor.update_parameters(**executor_parameters(exp))
    except (RuntimeError, ValueError, NameError) as exc:  # e.g. no srun: not on a Slurm cluster
        raise MhcLabError(f"launcher.kind {launcher.kind}: {str(exc).splitlines()[0]}") from None
    return executor


def executor_parameters(exp: Experiment) -> dict[str, Any]:
    """submitit's update_parameters() arguments for the launcher section (None = not given)."""
    launcher = exp.config.launcher
    params = {
        "name": f"mhc-{exp.config.name}",
        "timeout_min": launcher.time_min,
        "nodes": 1,
        "tasks_per_node": 1,
        "gpus_per_node": launcher.gpus_per_node or None,
        "cpus_per_task": launcher.cpus_per_task,
        "mem_gb": launcher.mem_gb,
        "slurm_partition": launcher.partition,
        "slurm_array_parallelism": launcher.array_parallelism,
        "slurm_setup": list(launcher.setup) or None,
        "slurm_additional_parameters": dict(launcher.sbatch) or None,
    }
    return {k: v for k, v in params.items() if v is not None}


def job_folder(exp: Experiment, store: ExperimentStore) -> Path:
    """launcher.log_folder (relative to the experiment file), or <experiment folder>/jobs."""
    given = exp.config.launcher.log_folder
    if given is None:
        return (store.root / "jobs").resolve()
    path = Path(given).expanduser()
    return (path if path.is_absolute() else exp.base_dir / path).resolve()


class SubmititLauncher(LockedLauncher):
    """`launcher: {kind: slurm}` or `submitit-local`: one job per pending run, as a job array.

    `wait`: show progress until every job has ended (else return once submitted); `notify`
    gets a line about the submission before the waiting starts."""

    def __init__(self, wait: bool = True, notify: Callable[[str], None] = lambda line: None) -> None:
        self.wait = wait
        self.notify = notify

    def execute(
        self, exp: Experiment, store: ExperimentStore, reporter: Reporter, only: Optional[set[str]] = None
    ) -> SweepOutcome:
        """Submit every pending run as a job (skipping runs whose job is still alive), record
        the jobs in jobs.json, and, with `wait`, show progress until all of them have ended."""
        runs, done, busy = plan(exp, store, only)
        todo = [r for r in runs if r.run_id not in done]
        outcome = SweepOutcome(skipped=len(done))
        handles: dict[str, Any] = {}
        if todo:
            handles = _submit(exp, store, todo)
            outcome.submitted = {rid: str(job.job_id) for rid, job in handles.items()}
            self.notify(f"submitted {len(todo)} runs as {exp.config.launcher.kind} jobs "
                        f"({', '.join(outcome.submitted.values())}): job ids in {store.jobs_json}, "
                        f"logs in {job_folder(exp, store)}")
        if busy:
            self.notify(f"{len(busy)} runs already have a job in flight: not submitted again")
        records = read_jobs(store)
        for rid in busy:  # submitted earlier: watch it too (a local job of another process: by its pid)
            handles[rid] = job_handle(records[rid]) if records[rid].cluster == "slurm" else None
        watched = [r for r in exp.runs if r.run_id in handles]
        if not self.wait:
            outcome.in_flight = [r.run_id for r in watched]
            outcome.summaries = [store.run(rid).read_summary() for rid in sorted(done)]
            return outcome
        everything = [r for r in exp.runs if r.run_id in done or r.run_id in handles]
        reporter.sweep_started(everything, done)
        outcome.lost = _watch(exp, store, watched, handles, records, reporter, everything, set(outcome.submitted))
        store.write_summary_csv([r.run_id for r in exp.runs])
        outcome.summaries = [s for r in everything if (s := store.run(r.run_id).read_summary())]
        return outcome


def _submit(exp: Experiment, store: ExperimentStore, todo: list[PlannedRun]) -> dict[str, Any]:
    """One job per run, as an array; returns run_id -> submitit job."""
    executor = make_executor(exp, store)
    portable = dataclasses.replace(exp, path=exp.path.resolve())  # jobs may start elsewhere
    # A failed run is tried again: its old result must not look like the new one, but it is
    # only set aside (and put back if the submission fails), never deleted before a job runs.
    set_aside = []
    for run in todo:
        files = store.run(run.run_id)
        if files.summary.exists():
            os.replace(files.summary, files.summary.with_name("summary.previous.json"))
            set_aside.append(files)
    try:
        jobs = executor.map_array(RunJob(), [portable] * len(todo), todo, [str(store.root.resolve())] * len(todo))
    except Exception as exc:  # sbatch refused (bad partition, account, ...): its message
        for files in set_aside:
            os.replace(files.summary.with_name("summary.previous.json"), files.summary)
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        raise MhcLabError(f"submitting {len(todo)} jobs failed: {lines[-1]}") from None
    cluster = CLUSTERS[exp.config.launcher.kind]
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    record_jobs(store, [
        JobRecord(run.run_id, str(job.job_id), cluster, str(job_folder(exp, store)), stamp)
        for run, job in zip(todo, jobs)
    ])
    return {run.run_id: job for run, job in zip(todo, jobs)}


def _watch(exp, store, runs, handles, records, reporter, everything, submitted: set[str]) -> list[str]:
    """Relay the runs' progress from their files until every job has ended; returns one line
    per job that ended without a result (`submitted`: the runs this process submitted)."""
    index = {r.run_id: i for i, r in enumerate(everything)}
    readers = {r.run_id: _ProgressReader(store.run(r.run_id)) for r in runs}
    pending = {r.run_id: r for r in runs}
    lost: list[str] = []
    while pending:
        for rid, run in list(pending.items()):
            reader = readers[rid]
            for event in reader.new_events():
                if not reader.announced:
                    reader.announced = True
                    reporter.run_started(run, index[rid])
                reporter.run_event(run, event)
            summary = store.run(rid).read_summary()
            if summary is None and job_state(records[rid], handles.get(rid)) not in ALIVE:
                time.sleep(0.2)  # the job may have written its summary just now
                summary = store.run(rid).read_summary()
                if summary is None:
                    lost.append(_lost_line(records[rid], handles.get(rid), own=rid in submitted))
                    del pending[rid]
                    continue
            if summary is not None:
                if not reader.announced:
                    reporter.run_started(run, index[rid])
                reporter.run_finished(run, summary)
                del pending[rid]
        if pending:
            time.sleep(exp.config.launcher.poll_s)
    return lost


def _lost_line(record: JobRecord, job: Any, own: bool) -> str:
    """Why a job ended without a result. submitit's result pickle (the job's exception) is
    read only for a job this process submitted: a folder from elsewhere could hold a crafted
    one (docs/results-format.md)."""
    state = job_state(record, job)
    detail = ""
    if job is not None and own:
        try:
            error = job.exception()
        except Exception as exc:  # noqa: BLE001 - only for the message
            error = exc
        if error is not None:
            lines = [l for l in str(error).splitlines() if l.strip() and not l.startswith("-")]
            detail = f": {lines[-1].strip()}" if lines else ""
    return (f"{record.run_id}: job {record.job_id} ended ({state}) without a result{detail}; "
            f"logs in {record.folder}; run the same command again to resume it")


class _ProgressReader:
    """Turns the lines a job appends to metrics.jsonl and probes.jsonl into progress events."""

    def __init__(self, files: RunFiles) -> None:
        self.files = files
        self.announced = False
        self.offsets = {files.metrics: 0, files.probes: 0}
        self.peak: Optional[float] = None

    def new_events(self) -> list[dict]:
        events = []
        for record in self._new_lines(self.files.probes):
            gain = as_float(record["headline"]["max_gain"])
            self.peak = gain if self.peak is None else max(self.peak, gain)
            events.append({"event": "probe", "step": record["step"], "val_loss": as_float(record["val_loss"]),
                           "gain": gain, "peak": self.peak})
        for record in self._new_lines(self.files.metrics):
            events.append({"event": "step", "step": record["step"], "loss": as_float(record["loss"]),
                           "grad_norm": as_float(record["grad_norm"])})
        return events

    def _new_lines(self, path: Path) -> list[dict]:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return []
        if size < self.offsets[path]:  # truncated on resume: read again from the start
            self.offsets[path] = 0
        with open(path, "rb") as f:
            f.seek(self.offsets[path])
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.offsets[path] += len(complete)
        records = []
        for line in complete.decode("utf-8", errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:  # a damaged line: `mhc-lab check` names it once the run is done
                continue
        return records
