"""What `mhc-lab run` checks before it trains or writes anything; `--dry-run` shows the same.

`preflight(exp, out, fresh)` writes nothing and returns:

- `refusals`: everything the real run would refuse, one line each: a results folder holding
  another version of the experiment, a folder another `mhc-lab run` is using, a folder that
  cannot be written while runs are left to train, a missing optional dependency (submitit for
  the submitit kinds, an enabled logging backend's package), a run whose memory estimate
  exceeds the machine's (training/memory.py);
- `notes`: what the run will do to what is there already: damaged runs moved aside and
  trained again, interrupted runs resumed;
- `statuses`: each run's status, for the dry-run table.

The real run refuses the same things where they happen (open_store and the launchers hold
the lock, so their word is final); this is the early, complete answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MhcLabError
from ..experiment.loader import Experiment
from ..store import IN_USE, ExperimentStore, StoreError, is_locked
from ..training.loggers import require_installed
from ..training.memory import memory_problem
from ..training.runner import DONE, run_status
from ..training.trainer import pick_device
from .base import damaged_runs, foreign_runs, read_only
from .inflight import submitit_module


@dataclass
class Preflight:
    """The answer of `preflight` (see the module docstring)."""

    refusals: list[MhcLabError] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    statuses: dict[str, str] = field(default_factory=dict)


def preflight(exp: Experiment, out: Path, fresh: bool = False) -> Preflight:
    """Everything the run of `exp` into `<out>/<name>` would refuse or do; writes nothing."""
    out = Path(out)
    store = ExperimentStore(out / exp.config.name)
    result = Preflight()
    existing = store.root.is_dir() and not fresh
    if is_locked(store.folder_lock):
        result.refusals.append(StoreError(f"{store.root}: {IN_USE}"))
    damaged = {c.run_id: c for c in damaged_runs(exp, store)} if existing else {}
    if existing:
        refusal = foreign_runs(exp, store)
        if refusal is not None:
            result.refusals.append(refusal)
    for run in exp.runs:
        status = "pending" if not existing else "damaged" if run.run_id in damaged else run_status(store.run(run.run_id))
        result.statuses[run.run_id] = status
    todo = [r for r in exp.runs if result.statuses[r.run_id] not in DONE]
    for check in damaged.values():
        result.notes.append(f"{check.problem}: {check.run_id} will be moved aside to {store.damaged_dir} "
                            "and trained again")
    resumed = [rid for rid, status in result.statuses.items() if status == "interrupted"]
    if resumed:
        result.notes.append(f"{len(resumed)} interrupted run(s) resume from their last checkpoint: "
                            + ", ".join(resumed))
    problem = read_only(exp, out)
    if problem is not None and (todo or fresh):
        result.refusals.append(StoreError(
            f"{problem}: cannot write results here ({len(todo)} run(s) to train); choose another --out"))
    launcher = exp.config.launcher
    if launcher.kind != "local":
        try:
            submitit_module()
        except MhcLabError as exc:
            result.refusals.append(exc)
    try:
        require_installed(exp.config.logging)  # W&B, TensorBoard when enabled
    except MhcLabError as exc:
        result.refusals.append(exc)
    if launcher.kind == "local" and todo:
        device = pick_device(todo[0].config.train.device)
        problem = memory_problem([(r.run_id, r.config) for r in todo], device, launcher.workers)
    elif launcher.mem_gb and not launcher.gpus_per_node and todo:  # a CPU job's memory
        problem = memory_problem([(r.run_id, r.config) for r in todo], pick_device("cpu"),
                                 available=int(launcher.mem_gb * 1e9))
    else:
        problem = None
    if problem is not None:
        result.refusals.append(MhcLabError(f"{exp.path}: {problem}"))
    return result
