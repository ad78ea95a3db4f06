"""The default launcher: the pending runs of a sweep, one after another, in this process."""

from __future__ import annotations

from typing import Optional

from ..experiment.loader import Experiment
from ..store import ExperimentStore
from ..training.runner import execute_run
from .base import LockedLauncher, Reporter, SweepOutcome, plan


class SerialLauncher(LockedLauncher):
    """`launcher: {kind: local, workers: 1}`: train each pending run in turn, here."""

    def execute(
        self, exp: Experiment, store: ExperimentStore, reporter: Reporter, only: Optional[set[str]] = None
    ) -> SweepOutcome:
        runs, done, busy = plan(exp, store, only)
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
