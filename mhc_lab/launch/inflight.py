"""Runs that a submitted job may still be training: jobs.json and the scheduler's word on it.

`mhc-lab run --launcher slurm` (slurm.py) records every submitted run's job in
<experiment>/jobs.json. Every launcher asks here before it trains or moves anything: a run
whose latest job is queued, running or unknown to the scheduler is never trained a second
time, and a folder with such jobs is never moved aside by --fresh. `mhc-lab ls` shows the
jobs' states from here too. Without submitit installed no job can be asked: none is in flight.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from ..errors import MhcLabError
from ..store import ExperimentStore, RunFiles, StoreError

CLUSTERS = {"slurm": "slurm", "submitit-local": "local"}  # launcher.kind -> submitit cluster
# Scheduler states of a job that may still train (submitit counts UNKNOWN as unfinished too:
# sacct often does not know a job in its first seconds).
ALIVE = {"PENDING", "CONFIGURING", "REQUEUED", "READY", "RUNNING", "COMPLETING", "SUSPENDED",
         "PREEMPTED", "RESIZING", "UNKNOWN"}
QUEUED = {"PENDING", "CONFIGURING", "REQUEUED", "READY"}


def submitit_module():
    """The submitit package, or MhcLabError naming the extra that installs it."""
    try:
        import submitit
    except ImportError:
        raise MhcLabError(
            "launcher kinds `slurm` and `submitit-local` need submitit: pip install 'mhc-lab[slurm]'"
        ) from None
    return submitit


# -- jobs.json -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class JobRecord:
    """One submitted run: where submitit keeps its job, and when it was submitted."""

    run_id: str
    job_id: str
    cluster: str  # submitit's name: slurm or local
    folder: str  # submitit's job folder (pickles and logs)
    submitted: str  # local time, ISO 8601


def read_jobs(store: ExperimentStore) -> dict[str, JobRecord]:
    """run_id -> its latest job, from jobs.json (empty if nothing was ever submitted)."""
    if not store.jobs_json.exists():
        return {}
    try:
        data = json.loads(store.jobs_json.read_text(encoding="utf-8"))
        records = {rid: JobRecord(run_id=rid, **rec) for rid, rec in data.get("jobs", {}).items()}
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise StoreError(f"{store.jobs_json}: damaged, not a list of submitted jobs ({exc}); "
                         "move it aside if no job of this folder is still running") from None
    for rid in records:
        store.run(rid)  # a plain run id, or StoreError: never a path out of the folder
    return records


# -- job states ------------------------------------------------------------------------------


def job_handle(record: JobRecord):
    submitit = submitit_module()
    if record.cluster == "slurm":
        return submitit.SlurmJob(folder=record.folder, job_id=record.job_id)
    return submitit.local.local.LocalJob(folder=record.folder, job_id=record.job_id)


def job_state(record: JobRecord, job: Any = None) -> str:
    """The scheduler's state of a job: PENDING, RUNNING, COMPLETED, TIMEOUT, ... (Slurm's
    words); FINISHED once submitit has its result. `job`: the live submitit handle, if this
    process submitted it."""
    submitit = submitit_module()
    paths = submitit.core.utils.JobPaths(record.folder, job_id=record.job_id, task_id=0)
    if paths.result_pickle.exists():
        return "FINISHED"
    if record.cluster == "local" and job is None:  # a local job of another process: its pid
        pid = str(record.job_id)
        if not pid.isdigit() or int(pid) <= 0:  # not a process id (a jobs.json from elsewhere)
            return "INTERRUPTED"
        return "RUNNING" if _pid_alive(int(pid)) else "INTERRUPTED"
    state = (job if job is not None else job_handle(record)).state
    return str(state).split()[0].upper()  # e.g. "CANCELLED by 1234" -> CANCELLED


def job_states(records: dict[str, JobRecord]) -> dict[str, str]:
    """job_state of many jobs; Slurm is asked once for all of them (one sacct call)."""
    handles = {rid: job_handle(r) for rid, r in records.items() if r.cluster == "slurm"}
    return {rid: job_state(r, handles.get(rid)) for rid, r in records.items()}


def _pid_alive(pid: int) -> bool:
    try:  # our own child that has exited (a zombie until reaped) is not alive
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def live_job_runs(store: ExperimentStore) -> set[str]:
    """Runs whose latest job may still train them (queued, running, or unknown to sacct).
    Without submitit (a results folder copied elsewhere) no job can be asked: none."""
    try:
        submitit_module()
    except MhcLabError:
        return set()
    unfinished = {rid: r for rid, r in read_jobs(store).items() if store.run(rid).read_summary() is None}
    return {rid for rid, state in job_states(unfinished).items() if state in ALIVE}


def submitted_view(store: ExperimentStore) -> dict[str, tuple[str, str]]:
    """For `mhc-lab ls`: run_id -> (job id, state), where state is `submitted` (queued),
    `running`, `finished` (the job ended; the run's own status says how), or the scheduler's
    word for a job that ended without a result (`timeout`, `cancelled`, ...)."""
    records = read_jobs(store)
    try:
        states = job_states(records)
    except MhcLabError:  # no submitit here
        states = {rid: "UNKNOWN" for rid in records}
    view = {}
    for rid, record in records.items():
        files = store.run(rid)
        state = states[rid]
        if files.read_summary() is not None or state in ("FINISHED", "COMPLETED"):
            label = "finished"
        elif state == "UNKNOWN":  # sacct does not know it (yet), or no submitit here
            label = "unknown"
        elif state in QUEUED or (state in ALIVE and not _started(files)):
            label = "submitted"
        elif state in ALIVE:
            label = "running"
        else:
            label = state.lower()
        view[rid] = (record.job_id, label)
    return view


def _started(files: RunFiles) -> bool:
    return files.metrics.exists() or files.checkpoint.exists()
