"""Progress display for `mhc-lab run`: a rich live display on a terminal, plain lines elsewhere.

Several runs may be in progress at once (`--workers N`, submitted jobs): every reporter keeps
its per-run state by run_id, so events of concurrent runs never mix.
"""

from __future__ import annotations

import math
import time
from typing import Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..store import as_float
from ..experiment.sweep import PlannedRun


def fmt_gain(x: object) -> str:
    """A gain for display; accepts the strings "inf"/"nan" that JSON files hold."""
    value = as_float(x)
    return "-" if math.isnan(value) else f"{value:.3g}"


def fmt_loss(x: object) -> str:
    return "-" if x is None or x == "" else f"{as_float(x):.3f}"


class RichReporter:
    """Bars for the sweep (runs done / total, ETA) and for each run in progress (step, loss, gain)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
        )
        self.sweep_task = None
        self.run_tasks: dict[str, object] = {}
        self.gains: dict[str, Optional[float]] = {}

    def sweep_started(self, runs: list[PlannedRun], done: set[str]) -> None:
        self.progress.start()
        self.sweep_task = self.progress.add_task("sweep", total=len(runs), completed=len(done), info=f"{len(done)} already done")

    def run_started(self, run: PlannedRun, index: int) -> None:
        self.gains[run.run_id] = None
        self.run_tasks[run.run_id] = self.progress.add_task(run.run_id, total=run.config.train.steps, info="")

    def run_event(self, run: PlannedRun, event: dict) -> None:
        if event["event"] == "note":  # e.g. "resuming <run> from step N"
            self.progress.console.print(f"  {event['line']}", markup=False, highlight=False, soft_wrap=True)
            return
        if event["event"] == "probe":
            self.gains[run.run_id] = event["peak"]
            return
        task = self.run_tasks.get(run.run_id)
        if task is None:
            return
        info = f"loss {event['loss']:.3f}  gain {fmt_gain(self.gains.get(run.run_id))}"
        self.progress.update(task, completed=event["step"] + 1, info=info)

    def run_finished(self, run: PlannedRun, summary: dict) -> None:
        task = self.run_tasks.pop(run.run_id, None)
        if task is not None:
            self.progress.remove_task(task)
        self.progress.advance(self.sweep_task)
        self.progress.console.print(_finished_line(summary), markup=False, highlight=False)  # a reason may hold [..]

    def close(self) -> None:
        self.progress.stop()


class PlainReporter:
    """One line per run start/end and a line every `every_s` seconds: readable in CI logs."""

    def __init__(self, console: Console, every_s: float = 10.0) -> None:
        self.console = console
        self.every_s = every_s
        self.total = 0
        self.done = 0
        self.started = 0
        self.last: dict[str, float] = {}
        self.gains: dict[str, Optional[float]] = {}

    def sweep_started(self, runs: list[PlannedRun], done: set[str]) -> None:
        self.total, self.done = len(runs), len(done)
        self.started = len(done)
        self.console.print(f"sweep: {len(runs)} runs, {len(done)} already done")

    def run_started(self, run: PlannedRun, index: int) -> None:
        self.gains[run.run_id] = None
        self.last[run.run_id] = time.monotonic()
        self.started += 1
        self.console.print(f"[{self.started}/{self.total}] {run.run_id}: {run.config.train.steps} steps")

    def run_event(self, run: PlannedRun, event: dict) -> None:
        if event["event"] == "note":  # e.g. "resuming <run> from step N"
            self.console.print(f"  {event['line']}", markup=False, highlight=False, soft_wrap=True)
            return
        if event["event"] == "probe":
            self.gains[run.run_id] = event["peak"]
            return
        now = time.monotonic()
        if now - self.last.get(run.run_id, 0.0) >= self.every_s:
            self.last[run.run_id] = now
            prefix = f"  {run.run_id}" if len(self.last) > 1 else " "
            self.console.print(
                f"{prefix} step {event['step']}: loss {event['loss']:.3f}, peak gain {fmt_gain(self.gains.get(run.run_id))}"
            )

    def run_finished(self, run: PlannedRun, summary: dict) -> None:
        self.done += 1
        self.last.pop(run.run_id, None)
        self.gains.pop(run.run_id, None)
        self.console.print(_finished_line(summary), markup=False, highlight=False)  # a reason may hold [..]

    def close(self) -> None:
        pass


def _finished_line(summary: dict) -> str:
    status = summary["status"]
    if status == "failed":
        return f"  {summary['run_id']}: failed: {summary.get('reason')}"
    extra = f" at step {summary['diverged_step']} ({summary['reason']})" if status == "diverged" else ""
    return (
        f"  {summary['run_id']}: {status}{extra}; final loss {fmt_loss(summary['final_loss'])}, "
        f"peak gain fwd {fmt_gain(summary['max_gain_fwd'])} / bwd {fmt_gain(summary['max_gain_bwd'])} "
        f"(step {summary['max_gain_step']}, layer {summary['max_gain_layer']}), {summary['wall_s']:.1f}s"
    )


def summary_table(summaries: list[dict], title: str = "runs") -> Table:
    """The key columns of a sweep's summaries as a rich table."""
    table = Table(title=title)
    for col in ("run_id", "connection", "depth", "d_model", "n", "lr", "seed", "status",
                "final loss", "val loss", "gain fwd", "gain bwd", "@step", "@layer", "wall s"):
        table.add_column(col, justify="left" if col in ("run_id", "connection", "status") else "right")
    for s in summaries:
        finished = s["status"] != "failed"
        table.add_row(
            s["run_id"], s["connection"], str(s["depth"]), str(s["d_model"]), str(s["n_streams"]),
            f"{s['lr']:g}", str(s["seed"]), s["status"],
            fmt_loss(s['final_loss']) if finished else "-",
            fmt_loss(s['final_val_loss']) if finished else "-",
            fmt_gain(s.get("max_gain_fwd")) if finished else "-",
            fmt_gain(s.get("max_gain_bwd")) if finished else "-",
            str(s.get("max_gain_step", "-")), str(s.get("max_gain_layer", "-")),
            f"{s['wall_s']:.1f}" if finished else "-",
        )
    return table
