"""The `mhc-lab` command line: thin commands over the library; errors become one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from .config import ExperimentConfig
from .errors import MhcLabError

app = typer.Typer(
    help="mhc-lab: train residual, HC and mHC language models and measure how the residual "
    "mixing amplifies the signal (the mHC paper's gain).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
if not console.is_terminal:  # CI logs, pipes: wide enough for the summary table
    console = Console(width=200)
err_console = Console(stderr=True)


def fail(error: MhcLabError) -> None:
    """Print one line and exit with the error's code (no traceback)."""
    err_console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
    raise typer.Exit(error.exit_code)


@app.command()
def run(
    file: Annotated[Path, typer.Argument(help="Experiment YAML file.", show_default=False)],
    out: Annotated[Path, typer.Option(help="Results root; the experiment goes to OUT/<name>/.")] = Path("results"),
    set_: Annotated[
        Optional[list[str]],
        typer.Option("--set", help="Override a key, e.g. --set model.depth=24 (repeatable)."),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and list the runs; write nothing.")] = False,
    fresh: Annotated[bool, typer.Option("--fresh", help="Move an existing results folder aside and start over.")] = False,
) -> None:
    """Run the sweep of an experiment file; re-running resumes where it stopped.

    Example: mhc-lab run experiments/smoke.yaml --set train.steps=20
    """
    from .experiment_file import load_experiment
    from .progress import PlainReporter, RichReporter, summary_table
    from .runner import open_store, run_status, run_sweep
    from .store import ExperimentStore

    try:
        exp = load_experiment(file, set_ or [])
    except MhcLabError as exc:
        fail(exc)
    if dry_run:
        store = ExperimentStore(out / exp.config.name)
        table = Table(title=f"{exp.config.name}: {len(exp.runs)} runs -> {store.root}")
        for col in ("run_id", "connection", "depth", "d_model", "n", "lr", "steps", "seed", "status"):
            table.add_column(col)
        for r in exp.runs:
            m, t = r.config.model, r.config.train
            table.add_row(r.run_id, m.connection, str(m.depth), str(m.d_model), str(m.n_streams),
                          f"{t.lr:g}", str(t.steps), str(r.config.seed), run_status(store.run(r.run_id)))
        console.print(table)
        return
    reporter = RichReporter(console) if console.is_terminal else PlainReporter(console)
    try:
        with open_store(exp, out, fresh) as store:
            try:
                outcome = run_sweep(exp, store, reporter)
            finally:
                reporter.close()
    except MhcLabError as exc:
        fail(exc)
    except KeyboardInterrupt:
        err_console.print("interrupted: run the same command again to resume")
        raise typer.Exit(130)
    console.print(summary_table(outcome.summaries, title=f"{exp.config.name} ({store.root})"))
    failed = outcome.count("failed")
    console.print(
        f"{len(outcome.summaries)} runs: {outcome.count('completed')} completed, "
        f"{outcome.count('diverged')} diverged, {failed} failed, {outcome.skipped} already done"
    )
    if failed:
        raise typer.Exit(1)


@app.command("ls")
def list_results(
    results: Annotated[Path, typer.Argument(help="Results root (or one experiment folder).")] = Path("results"),
) -> None:
    """List experiments under a results root and the status of their runs.

    Example: mhc-lab ls results
    """
    from .runner import run_status
    from .store import ExperimentStore, list_experiments

    stores = [ExperimentStore(results)] if (results / "experiment.yaml").exists() else list_experiments(results)
    if not stores:
        fail(MhcLabError(f"{results}: no experiments found (run `mhc-lab run FILE` first)"))
    for store in stores:
        table = Table(title=str(store.root))
        for col in ("run_id", "status", "steps", "peak gain", "final loss"):
            table.add_column(col)
        for rid in store.run_ids():
            files = store.run(rid)
            s = files.read_summary() or {}
            gain = max(s.get("max_gain_fwd") or 0, s.get("max_gain_bwd") or 0) if s else None
            table.add_row(
                rid, run_status(files), str(s.get("steps_done", "-")),
                f"{gain:.3g}" if gain else "-",
                f"{s['final_loss']:.3f}" if s.get("final_loss") is not None else "-",
            )
        console.print(table)


@app.command()
def schema(
    out: Annotated[Optional[Path], typer.Option(help="Write to this file instead of printing.")] = None,
) -> None:
    """Print the JSON Schema of experiment files (for editor completion and checking).

    Example: mhc-lab schema --out experiment.schema.json
    """
    text = json.dumps(ExperimentConfig.model_json_schema(), indent=2) + "\n"
    if out is None:
        sys.stdout.write(text)
    else:
        from .store import atomic_write_text

        atomic_write_text(out, text)
        console.print(f"wrote {out}")


def main() -> None:  # pragma: no cover - console entry
    app()


# bench: training-step time of residual, HC and mHC (logic in mhc_lab/bench.py)


@app.command()
def bench(
    d_model: Annotated[
        Optional[list[int]],
        typer.Option("--d-model", help="Width C to measure (repeatable). Default: 64, 256, 512.", show_default=False),
    ] = None,
    depth: Annotated[int, typer.Option(help="Transformer blocks (two layers each).")] = 12,
    n_streams: Annotated[int, typer.Option(help="Expansion rate n of HC and mHC.")] = 4,
    batch: Annotated[int, typer.Option(help="Sequences per step.")] = 16,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = 128,
    steps: Annotated[int, typer.Option(help="Timed repetitions (each times one step of every variant).")] = 10,
    warmup: Annotated[int, typer.Option(help="Untimed steps per variant first.")] = 3,
    sinkhorn_iters: Annotated[int, typer.Option(help="mHC Sinkhorn iterations (paper: 20).")] = 20,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    threads: Annotated[
        Optional[int], typer.Option(help="torch CPU threads (default: torch's own choice).", show_default=False)
    ] = None,
    peer: Annotated[
        bool, typer.Option("--peer/--no-peer", help="Add rows for the hyper-connections package if installed.")
    ] = True,
    json_: Annotated[bool, typer.Option("--json", help="Print JSON (rows and environment) instead of a table.")] = False,
) -> None:
    """Time training steps (forward, backward, AdamW) of residual, HC and mHC models, interleaved.

    Example: mhc-lab bench --d-model 64 --d-model 256 --steps 10 --json
    """
    from .bench import BenchSettings, render_table, run_bench, to_json

    settings = BenchSettings(
        d_models=list(d_model) if d_model else [64, 256, 512],
        depth=depth,
        n_streams=n_streams,
        seq_len=seq_len,
        batch=batch,
        steps=steps,
        warmup=warmup,
        sinkhorn_iters=sinkhorn_iters,
        peer=peer,
        device=device,
        threads=threads,
    )
    try:
        rows = run_bench(settings, progress=lambda line: err_console.print(line, style="dim", highlight=False))
    except MhcLabError as exc:
        fail(exc)
    if json_:
        typer.echo(to_json(rows, settings))
    else:
        console.print(render_table(rows, settings))
