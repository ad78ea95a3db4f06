"""Progress display for `mhc-lab run`: a rich live display on a terminal, plain lines elsewhere."""

from __future__ import annotations

import time
from typing import Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .sweep import PlannedRun


def _fmt_gain(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}"


class RichReporter:
    """Two bars: the sweep (runs done / total, ETA) and the current run (step, loss, gain)."""

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
        self.run_task = None
        self.gain = None

    def sweep_started(self, runs: list[PlannedRun], done: set[str]) -> None:
        self.progress.start()
        self.sweep_task = self.progress.add_task("sweep", total=len(runs), completed=len(done), info=f"{len(done)} already done")

    def run_started(self, run: PlannedRun, index: int) -> None:
        if self.run_task is not None:
            self.progress.remove_task(self.run_task)
        self.gain = None
        self.run_task = self.progress.add_task(run.run_id, total=run.config.train.steps, info="")

    def run_event(self, run: PlannedRun, event: dict) -> None:
        if event["event"] == "probe":
            self.gain = event["peak"]
            return
        info = f"loss {event['loss']:.3f}  gain {_fmt_gain(self.gain)}"
        self.progress.update(self.run_task, completed=event["step"] + 1, info=info)

    def run_finished(self, run: PlannedRun, summary: dict) -> None:
        self.progress.advance(self.sweep_task)
        self.progress.console.print(_finished_line(summary))

    def close(self) -> None:
        self.progress.stop()


class PlainReporter:
    """One line per run start/end and a line every `every_s` seconds: readable in CI logs."""

    def __init__(self, console: Console, every_s: float = 10.0) -> None:
        self.console = console
        self.every_s = every_s
        self.total = 0
        self.done = 0
        self.last = 0.0
        self.gain: Optional[float] = None

    def sweep_started(self, runs: list[PlannedRun], done: set[str]) -> None:
        self.total, self.done = len(runs), len(done)
        self.console.print(f"sweep: {len(runs)} runs, {len(done)} already done")

    def run_started(self, run: PlannedRun, index: int) -> None:
        self.gain = None
        self.last = time.monotonic()
        self.console.print(f"[{self.done + 1}/{self.total}] {run.run_id}: {run.config.train.steps} steps")

    def run_event(self, run: PlannedRun, event: dict) -> None:
        if event["event"] == "probe":
            self.gain = event["peak"]
            return
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self.console.print(f"  step {event['step']}: loss {event['loss']:.3f}, peak gain {_fmt_gain(self.gain)}")

    def run_finished(self, run: PlannedRun, summary: dict) -> None:
        self.done += 1
        self.console.print(_finished_line(summary))

    def close(self) -> None:
        pass


def _finished_line(summary: dict) -> str:
    status = summary["status"]
    if status == "failed":
        return f"  {summary['run_id']}: failed: {summary.get('reason')}"
    extra = f" at step {summary['diverged_step']} ({summary['reason']})" if status == "diverged" else ""
    return (
        f"  {summary['run_id']}: {status}{extra}; final loss {summary['final_loss']:.3f}, "
        f"peak gain fwd {_fmt_gain(summary['max_gain_fwd'])} / bwd {_fmt_gain(summary['max_gain_bwd'])} "
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
            f"{s['final_loss']:.3f}" if finished else "-",
            f"{s['final_val_loss']:.3f}" if finished else "-",
            _fmt_gain(s.get("max_gain_fwd")) if finished else "-",
            _fmt_gain(s.get("max_gain_bwd")) if finished else "-",
            str(s.get("max_gain_step", "-")), str(s.get("max_gain_layer", "-")),
            f"{s['wall_s']:.1f}" if finished else "-",
        )
    return table
