"""Launchers: the ways a sweep's runs can execute, behind one interface (base.py).

    make_launcher(settings)  -> SerialLauncher | WorkersLauncher | SubmititLauncher
    run_sweep(exp, store)    the local launchers on an already open store (library use, tests)

torchrun.py is chosen by how the process was started (torchrun sets WORLD_SIZE), not by
`launcher.kind`; `mhc-lab run` hands over to it.
"""

from __future__ import annotations

from typing import Callable, Optional

from ..experiment.config import LauncherConfig
from ..experiment.loader import Experiment
from ..store import ExperimentStore
from .base import Launcher, LockedLauncher, Reporter, SilentReporter, SweepOutcome, open_store

__all__ = [
    "Launcher", "LockedLauncher", "Reporter", "SilentReporter", "SweepOutcome",
    "make_launcher", "open_store", "run_sweep",
]


def make_launcher(
    settings: LauncherConfig, wait: bool = True, notify: Callable[[str], None] = lambda line: None
) -> LockedLauncher:
    """The launcher for an experiment's `launcher` section. `wait` and `notify` apply to the
    submitit kinds (return once submitted; a line about the submission)."""
    if settings.kind == "local":
        if settings.workers > 1:
            from .workers import WorkersLauncher

            return WorkersLauncher(settings.workers)
        from .serial import SerialLauncher

        return SerialLauncher()
    from .slurm import SubmititLauncher

    return SubmititLauncher(wait=wait, notify=notify)


def run_sweep(
    exp: Experiment,
    store: ExperimentStore,
    reporter: Optional[Reporter] = None,
    only: Optional[set[str]] = None,
    workers: int = 1,
) -> SweepOutcome:
    """Train every pending run of `exp` (or only those in `only`) into an open store, one after
    another or `workers` at once in separate processes; files and outcome are the same."""
    launcher = make_launcher(LauncherConfig(kind="local", workers=workers))
    return launcher.execute(exp, store, reporter or SilentReporter(), only)
