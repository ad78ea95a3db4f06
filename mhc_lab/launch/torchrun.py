"""Data-parallel training of one run over several processes: torchrun + DistributedDataParallel.

    torchrun --nproc_per_node 2 -m mhc_lab.launch.torchrun experiments/smoke.yaml [--run-id RUN_ID]

Every rank builds the same model from the same seed and draws the same global batch,
`data.training_batch(seed, step)` with train.batch_size rows; rank r of W trains on rows
[r B/W, (r+1) B/W). DDP averages the gradients over ranks, and a mean of W equal-sized slice
means is the mean over the whole batch, so each update is the single-process update (up to
float rounding). The logged loss is averaged over ranks; the gradient norm is that of the
averaged gradient, as one process would see it. Probes (val_loss, the gain), checkpoints and
every results file are rank 0's alone; on resume rank 0 reads the checkpoint and sends it to
the others, so only rank 0 needs the results folder. Every rank dies with torchrun's agent
(lifeline.py): killing torchrun leaves no rank training or waiting on the others. Backend: NCCL on CUDA, gloo on CPU; bf16
autocast (train.autocast_bf16) wraps the DDP forward as it wraps the plain one.

Without --run-id, the pending runs of the sweep train one after another, each over all ranks.
A run that fails is recorded as `failed` (summary.json, error.txt) and then stops the job:
the other ranks cannot go on in step with it. `mhc-lab run` started by torchrun (WORLD_SIZE
set) comes here too.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..errors import MhcLabError
from ..experiment.config import RunConfig
from ..experiment.loader import ConfigError, Experiment, load_experiment
from ..store import ExperimentStore, JsonlWriter, RunFiles
from ..training.runner import execute_run
from ..training.trainer import Trainer, pick_device, read_checkpoint
from .base import Launcher, Reporter, SilentReporter, SweepOutcome, open_store, plan
from .lifeline import die_if_orphaned, die_with_parent


def world_size() -> int:
    """The number of processes torchrun started (1 when not started by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


class _NoLog:
    """What ranks other than 0 write to metrics.jsonl and probes.jsonl: nothing."""

    def write(self, record: dict) -> None: ...
    def close(self) -> None: ...


class DataParallelTrainer(Trainer):
    """trainer.Trainer over all ranks of the default process group (see the module docstring)."""

    def __init__(
        self, cfg: RunConfig, files: RunFiles, base_dir: Optional[Path] = None, progress=None, logger=None
    ) -> None:
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        zero = self.rank == 0  # progress and live logging: rank 0 alone
        super().__init__(cfg, files, base_dir, progress if zero else None, logger if zero else None)
        if cfg.train.batch_size % self.world:
            raise ValueError(
                f"train.batch_size ({cfg.train.batch_size}) must be divisible by the number of "
                f"processes ({self.world})"
            )
        device_ids = [torch.cuda.current_device()] if self.device.type == "cuda" else None  # LOCAL_RANK's
        ddp = DistributedDataParallel(self.model, device_ids=device_ids)  # broadcasts rank 0's weights
        self.forward = torch.compile(ddp) if cfg.train.compile else ddp

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = super().batch(step)  # the global batch, as one process would draw it: (B, T)
        rows = slice(self.rank * len(x) // self.world, (self.rank + 1) * len(x) // self.world)
        return x[rows], y[rows]  # (B / W, T)

    def loss_value(self, loss: torch.Tensor) -> float:
        total = loss.detach().float().clone()
        dist.all_reduce(total)
        return total.item() / self.world

    def open_log(self, path: Path) -> JsonlWriter:
        return super().open_log(path) if self.rank == 0 else _NoLog()

    @torch.no_grad()
    def probe(self, step: int, writer: JsonlWriter) -> dict:
        if self.rank == 0:
            return super().probe(step, writer)
        return {"val_loss": math.nan, "headline": {"max_gain": math.nan}}

    def save_checkpoint(self) -> None:
        if self.rank == 0:
            super().save_checkpoint()

    def load_checkpoint(self) -> bool:
        """Rank 0 resumes from its checkpoint (or the previous one, or starts afresh:
        trainer.Trainer.load_checkpoint) and sends the bytes it resumed from to the others,
        which read them as it did: weights only, never unpickling code."""
        found = super().load_checkpoint() if self.rank == 0 else False
        message = [self.resumed_from if found else None]
        dist.broadcast_object_list(message, src=0)  # also keeps rank 0 from writing before all have read
        if message[0] is not None and self.rank != 0:
            self.restore(read_checkpoint(message[0], self.device, f"{self.files.checkpoint} (from rank 0)"))
        return message[0] is not None

    def _finish(self, status: str, reason: Optional[str], diverged_step: Optional[int], steps_done: int) -> dict:
        if self.rank != 0:
            return {"status": status}
        summary = super()._finish(status, reason, diverged_step, steps_done)
        summary["environment"]["world_size"] = self.world
        return summary


def train_data_parallel(
    cfg: RunConfig, files: RunFiles, base_dir: Optional[Path] = None, progress=None, logger=None
) -> dict:
    """trainer.train_run over all ranks (every rank calls it; rank 0's summary is the run's,
    and only rank 0 gets a `logger`, from execute_run). A rank whose torchrun is gone dies
    instead of raising: its peer's death (by the same kill) is no failure of the run to record,
    and the run resumes from its checkpoint."""
    try:
        return DataParallelTrainer(cfg, files, base_dir, progress, logger).run()
    except Exception:
        die_if_orphaned()
        raise


class TorchrunLauncher(Launcher):
    """Every pending run of the sweep data-parallel over all ranks of the process group, one
    run after another (see the module docstring). Every rank calls `run`."""

    def run(
        self,
        exp: Experiment,
        out: Path,
        fresh: bool = False,
        reporter: Optional[Reporter] = None,
        only: Optional[set[str]] = None,
    ) -> SweepOutcome:
        """The pending runs (or those in `only`), each over all ranks. Rank 0 holds the
        results folder's lock, decides what is pending and writes every file; the others
        follow its list. Returns the outcome on rank 0, an empty one elsewhere."""
        return _run_ranks(exp, out, fresh, reporter, only)


def _run_ranks(
    exp: Experiment, out: Path, fresh: bool, reporter: Optional[Reporter], only: Optional[set[str]]
) -> SweepOutcome:
    rank = dist.get_rank()
    reporter = reporter if rank == 0 and reporter is not None else SilentReporter()
    store = ExperimentStore(Path(out) / exp.config.name)
    with ExitStack() as stack:
        decision: list = [None, []]  # [error message or None, ids of the runs to train]
        if rank == 0:
            try:
                stack.enter_context(open_store(exp, out, fresh))
                planned, done, _busy = plan(exp, store, only)  # never a run a job trains
                decision[1] = [r.run_id for r in planned if r.run_id not in done]
            except MhcLabError as exc:
                decision[0] = str(exc)
        dist.broadcast_object_list(decision, src=0)
        if decision[0] is not None:
            raise MhcLabError(decision[0])
        todo = set(decision[1])
        runs = [r for r in exp.runs if only is None or r.run_id in only]
        reporter.sweep_started(runs, {r.run_id for r in runs if r.run_id not in todo})
        all_ids = [r.run_id for r in exp.runs]
        outcome = SweepOutcome()
        for index, run in enumerate(runs):
            files = store.run(run.run_id)
            if run.run_id not in todo:
                outcome.summaries.append(files.read_summary() if rank == 0 else {})
                outcome.skipped += 1
            elif rank != 0:  # trains in step with rank 0, writes nothing
                try:
                    train_data_parallel(run.config, files, exp.base_dir)
                except Exception as exc:
                    raise RunFailed(f"rank {rank}: {run.run_id} failed: {type(exc).__name__}: {exc}") from exc
            else:
                reporter.run_started(run, index)
                progress = lambda event, run=run: reporter.run_event(run, event)  # noqa: E731
                summary = execute_run(exp, run, files, progress, train_data_parallel)
                outcome.summaries.append(summary)
                store.write_summary_csv(all_ids)
                reporter.run_finished(run, summary)
                if summary["status"] == "failed":
                    raise RunFailed(
                        f"{run.run_id} failed: {summary['reason']}; recorded in {files.root}, and the "
                        "job stops (the other ranks cannot go on in step)"
                    )
        if rank == 0:
            store.write_summary_csv(all_ids)
        return outcome


class RunFailed(MhcLabError):
    """A run failed during data-parallel training: recorded by rank 0, and the job stops."""

    exit_code = 1


def _init_process_group(exp: Experiment) -> torch.device:
    devices = {pick_device(r.config.train.device).type for r in exp.runs}
    if len(devices) != 1:
        raise ConfigError(f"{exp.path}: data-parallel runs must share one device type (got {sorted(devices)})")
    device = devices.pop()
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=timedelta(minutes=30))
    return torch.device(device)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="torchrun --nproc_per_node N -m mhc_lab.launch.torchrun",
        description="Train runs of an experiment data-parallel over the processes torchrun starts.",
    )
    parser.add_argument("file", type=Path, help="Experiment YAML file.")
    parser.add_argument("--out", type=Path, default=Path("results"), help="Results root (default: results).")
    # Not `--run`: torchrun's own parser would take it for an abbreviation of its --run-path.
    parser.add_argument("--run-id", action="append", dest="runs", metavar="RUN_ID",
                        help="Train only this run (repeatable); default: every pending run of the sweep.")
    parser.add_argument("--set", action="append", dest="overrides", default=[], metavar="KEY=VALUE",
                        help="Override a key, e.g. --set model.depth=24 (repeatable).")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], help="Sets train.device.")
    parser.add_argument("--fresh", action="store_true", help="Move an existing results folder aside first.")
    return parser.parse_args(argv)


def launch(
    file: Path,
    out: Path,
    overrides: list[str],
    runs: Optional[list[str]] = None,
    fresh: bool = False,
    reporter: Optional[Reporter] = None,
) -> tuple[Experiment, SweepOutcome]:
    """Load the experiment, join the process group, train, leave the group (every rank calls it)."""
    exp = load_experiment(file, overrides)
    unknown = sorted(set(runs or ()) - {r.run_id for r in exp.runs})
    if unknown:
        raise ConfigError(f"{file}: --run-id {unknown[0]}: no such run in this sweep (see mhc-lab run {file} --dry-run)")
    world = world_size()
    bad = [r.run_id for r in exp.runs if (not runs or r.run_id in runs) and r.config.train.batch_size % world]
    if bad:
        raise ConfigError(
            f"{file}: train.batch_size must be divisible by the number of processes ({world}) for run {bad[0]}"
        )
    _init_process_group(exp)
    try:
        outcome = TorchrunLauncher().run(exp, out, fresh, reporter, set(runs) if runs else None)
        # Leave together: a rank that tears gloo down while another still holds its connection
        # can abort the other at exit ("terminate called without an active exception").
        dist.barrier()
        return exp, outcome
    finally:
        dist.destroy_process_group()


def main(argv: Optional[list[str]] = None) -> int:
    """The torchrun entry point; rank 0 prints progress and the summary table."""
    from rich.console import Console
    from rich.markup import escape

    from .progress import PlainReporter, summary_table

    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun's agent: never outlive it
        die_with_parent(os.getppid())
    args = parse_args(argv)
    overrides = list(args.overrides) + ([f"train.device={args.device}"] if args.device else [])
    rank = int(os.environ.get("RANK", "0"))
    console = Console(width=200)
    try:
        exp, outcome = launch(args.file, args.out, overrides, args.runs, args.fresh, PlainReporter(console))
    except MhcLabError as exc:
        if rank == 0 or isinstance(exc, RunFailed):
            Console(stderr=True).print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return exc.exit_code
    if rank == 0:
        console.print(summary_table(outcome.summaries, title=f"{exp.config.name} ({args.out / exp.config.name})"))
        console.print(
            f"{len(outcome.summaries)} runs over {world_size()} processes: {outcome.count('completed')} "
            f"completed, {outcome.count('diverged')} diverged, {outcome.count('failed')} failed, "
            f"{outcome.skipped} already done"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
