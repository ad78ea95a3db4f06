"""The `mhc-lab` command line: thin commands over the library; errors become one line."""

from __future__ import annotations

import json
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .experiment.config import ExperimentConfig
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
    err_console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
    raise typer.Exit(error.exit_code)


@contextmanager
def one_line_errors() -> Iterator[None]:
    """MhcLabError, and any OSError reading or writing a file (a folder the user cannot write,
    a disk full), end the command in one line naming the file."""
    try:
        yield
    except MhcLabError as exc:
        fail(exc)
    except OSError as exc:
        where = exc.filename or "results"
        fail(MhcLabError(f"{where}: {exc.strerror or exc}"))


class Terminated(KeyboardInterrupt):
    """SIGTERM (`timeout`, `kill`, a Slurm time limit): stop like Ctrl-C, keeping checkpoints."""


def _terminate(signum, frame) -> None:
    raise Terminated


def _problems(lines: list[str], noun: str, then: str) -> None:
    """End the command on its problems: every line but the first printed as it is, then one
    error line naming the first (`<first>; <then>`), exit code 1 (DamagedResults)."""
    from .store import DamagedResults

    if not lines:
        return
    for line in lines[1:]:
        err_console.print(f"[yellow]also:[/] {escape(line)}", highlight=False, soft_wrap=True)
    count = f"{len(lines)} {noun}, the first: " if len(lines) > 1 else ""
    fail(DamagedResults(f"{count}{lines[0]}; {then}"))


@app.command()
def run(
    file: Annotated[Path, typer.Argument(help="Experiment YAML file.", show_default=False)],
    out: Annotated[Path, typer.Option(help="Results root; the experiment goes to OUT/<name>/.")] = Path("results"),
    set_: Annotated[
        Optional[list[str]],
        typer.Option("--set", help="Override a key, e.g. --set train.lr=0.01 (repeatable); a key the sweep "
                     "varies is refused: change the sweep, e.g. --set 'sweep.grid.model.depth=[24]'."),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate, list the runs and everything the real run "
                                          "would refuse or do to the runs there; write nothing.")] = False,
    fresh: Annotated[bool, typer.Option("--fresh", help="Move an existing results folder aside and start over.")] = False,
    workers: Annotated[
        Optional[int], typer.Option(help="Train this many runs at once on this machine (launcher.workers).", show_default=False)
    ] = None,
    launcher: Annotated[
        Optional[str],
        typer.Option(help="Where runs train: local, slurm or submitit-local (launcher.kind).", show_default=False),
    ] = None,
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="slurm, submitit-local: submit and return; `mhc-lab ls` follows the jobs.")
    ] = False,
    device: Annotated[
        Optional[str], typer.Option(help="auto, cpu, cuda or mps (train.device).", show_default=False)
    ] = None,
) -> None:
    """Run the sweep of an experiment file; re-running resumes where it stopped.

    Example: mhc-lab run experiments/smoke.yaml --set train.steps=20 --workers 2
    """
    from .experiment.loader import ConfigError, load_experiment
    from .launch import make_launcher
    from .launch.preflight import preflight
    from .launch.progress import PlainReporter, RichReporter, summary_table
    from .store import ExperimentStore

    options = {"launcher.workers": workers, "launcher.kind": launcher, "train.device": device}
    flags = {"launcher.workers": "--workers", "launcher.kind": "--launcher", "train.device": "--device"}
    origins = {key: flags[key] for key, value in options.items() if value is not None}
    overrides = list(set_ or []) + [f"{key}={value}" for key, value in options.items() if value is not None]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dry_run:  # started by torchrun
        from .launch.torchrun import main as data_parallel_main

        sets = [arg for item in overrides for arg in ("--set", item)]
        raise typer.Exit(data_parallel_main([str(file), "--out", str(out), *sets] + (["--fresh"] if fresh else [])))
    try:
        exp = load_experiment(file, overrides, origins)
        kind = exp.config.launcher.kind
        if workers is not None and kind != "local":
            raise ConfigError(f"--workers applies to launcher kind local, not {kind}")
        if no_wait and kind == "local":
            raise ConfigError("--no-wait applies to submitted jobs: add --launcher slurm (or submitit-local)")
        with one_line_errors():
            checked = preflight(exp, out, fresh)  # everything the run would refuse, before writing
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
                          f"{t.lr:g}", str(t.steps), str(r.config.seed), checked.statuses[r.run_id])
        console.print(table)
    for line in checked.notes:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    if checked.refusals:
        for refusal in checked.refusals[:-1]:
            err_console.print(f"[bold red]error:[/] {escape(str(refusal))}", highlight=False, soft_wrap=True)
        fail(checked.refusals[-1])
    if dry_run:
        return
    reporter = RichReporter(console) if console.is_terminal else PlainReporter(console)
    previous = signal.signal(signal.SIGTERM, _terminate) if _main_thread() else None
    try:
        with one_line_errors():
            say = lambda line: console.print(line, highlight=False, soft_wrap=True)  # noqa: E731
            sweep_launcher = make_launcher(exp.config.launcher, wait=not no_wait, notify=say)
            try:
                outcome = sweep_launcher.run(exp, out, fresh, reporter)
            finally:
                reporter.close()
    except KeyboardInterrupt as exc:
        how, code = ("terminated", 143) if isinstance(exc, Terminated) else ("interrupted", 130)
        if kind == "local":
            err_console.print(f"{how}: run the same command again to resume")
        else:
            err_console.print(f"{how}: stopped waiting: the submitted jobs go on (`mhc-lab ls` shows them); "
                              "run the same command again to wait for them")
        raise typer.Exit(code)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    root = out / exp.config.name
    if no_wait:
        console.print(f"not waiting: `mhc-lab ls {root}` shows the jobs; run the same command "
                      "again to wait for them and print the summary", soft_wrap=True)
        return
    console.print(summary_table(outcome.summaries, title=f"{exp.config.name} ({root})"))
    failed = outcome.count("failed")
    console.print(
        f"{len(outcome.summaries)} runs: {outcome.count('completed')} completed, "
        f"{outcome.count('diverged')} diverged, {failed} failed, {outcome.skipped} already done"
    )
    if outcome.in_flight:
        console.print(f"{len(outcome.in_flight)} runs left alone: submitted jobs are still training them "
                      f"({', '.join(outcome.in_flight)}); `mhc-lab ls {root}` shows them", soft_wrap=True)
    for line in outcome.lost:
        err_console.print(line, highlight=False, soft_wrap=True)
    if failed or outcome.lost:
        raise typer.Exit(1)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


@app.command("ls")
def list_results(
    results: Annotated[Path, typer.Argument(help="Results root (or one experiment folder).")] = Path("results"),
) -> None:
    """List experiments under a results root and the status of their runs.

    A run is completed, diverged or failed once finished; training (a process holds its lock
    now), interrupted (started, not running: `run` resumes it), pending, or damaged (its files
    differ from what it wrote: `mhc-lab check`).

    Example: mhc-lab ls results
    """
    from .launch.progress import fmt_gain, fmt_loss
    from .store import ExperimentStore, StoreError, check_run, list_experiments, peak_gain
    from .training.runner import run_status

    stores = [ExperimentStore(results)] if (results / "experiment.yaml").exists() else list_experiments(results)
    if not stores:
        fail(MhcLabError(f"{results}: no experiments found (run `mhc-lab run FILE` first)"))
    problems: list[str] = []
    with one_line_errors():
        for store in stores:
            jobs: dict[str, tuple[str, str]] = {}
            if store.jobs_json.exists():  # runs submitted as jobs: their job's state too
                from .launch.inflight import submitted_view

                try:
                    jobs = submitted_view(store)
                except StoreError as exc:
                    problems.append(str(exc))
            table = Table(title=str(store.root))
            for col in ("run_id", "status", "steps", "peak gain", "final loss") + (("job",) if jobs else ()):
                table.add_column(col)
            for rid in sorted(set(store.run_ids()) | set(jobs)):
                files = store.run(rid)
                check = check_run(files, thorough=False)  # sizes only: quick
                if check.damaged:
                    problems.append(check.problem)
                s = {} if check.damaged else files.read_summary() or {}
                job_id, job_state = jobs.get(rid, ("-", "-"))
                status = ("damaged" if check.damaged else job_state if job_state in ("submitted", "running")
                          else run_status(files))
                table.add_row(
                    rid, status, str(s.get("steps_done", "-")),
                    fmt_gain(peak_gain(s)),
                    fmt_loss(s.get("final_loss")),
                    *((f"{job_id} {job_state}",) if jobs else ()),
                )
            console.print(table)
    _problems(problems, "damaged files", f"`mhc-lab check {results} --repair` moves damaged runs aside, "
              "`mhc-lab run` trains them again")


@app.command()
def check(
    results: Annotated[Path, typer.Argument(help="Results root, or one experiment folder.")] = Path("results"),
    repair: Annotated[
        bool, typer.Option("--repair", help="Move damaged runs aside to <experiment>/damaged/ (never deleted), "
                           "so that `mhc-lab run` trains them again.")
    ] = False,
) -> None:
    """Check every finished run against what it wrote (line counts, sha256 in its summary.json).

    One line per damaged run and exit code 1 if any is damaged (also with --repair). Runs
    written before mhc-lab recorded their files are only checked to parse, and said so.

    Example: mhc-lab check results/smoke --repair
    """
    from .store import ExperimentStore, check_store, exclusive_lock, list_experiments, move_aside

    stores = [ExperimentStore(results)] if (results / "experiment.yaml").exists() else list_experiments(results)
    if not stores:
        fail(MhcLabError(f"{results}: no experiments found (give a results folder written by `mhc-lab run`)"))
    counts = {"fine": 0, "unchecked": 0, "damaged": 0, "unfinished": 0}
    damaged: list[str] = []
    with one_line_errors():
        for store in stores:
            checks = check_store(store)
            bad = [c for c in checks if c.damaged]
            for c in checks:
                counts[c.state] += 1
            unchecked = [c for c in checks if c.state == "unchecked"]
            if unchecked:
                console.print(f"{store.root}: {len(unchecked)} run(s) without an integrity record (written before "
                              "mhc-lab recorded one): not checkable against it, only checked that their files "
                              "parse", highlight=False, soft_wrap=True)
            if repair and bad:  # like `run`: under the folder's lock, never while it trains
                with exclusive_lock(store.folder_lock, store.root):
                    for c in bad:
                        damaged.append(f"{c.problem}; moved aside to {move_aside(store, c.run_id)}")
            else:
                damaged += [c.problem for c in bad]
    console.print(f"checked {sum(counts.values()) - counts['unfinished']} finished runs: {counts['fine']} fine, "
                  f"{counts['unchecked']} without a record (files parse), {counts['damaged']} damaged"
                  + (f"; {counts['unfinished']} unfinished not checked" if counts["unfinished"] else ""),
                  highlight=False, soft_wrap=True)
    then = "`mhc-lab run` trains them again" if repair else f"`mhc-lab check {results} --repair` moves them aside"
    _problems(damaged, "damaged runs", then)


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

        with one_line_errors():
            atomic_write_text(out, text)
        console.print(f"wrote {out}")


from enum import Enum  # noqa: E402 - kept with the plot/report commands, which alone use it


class FigureFormat(str, Enum):
    """Image formats `mhc-lab plot` writes."""

    png = "png"
    svg = "svg"
    pdf = "pdf"


RESULTS_HELP = "Experiment results folder (e.g. results/smoke); default: the most recent under ./results."


def _results_view(results: Optional[Path]):
    """The experiment folder given, or the most recently written one under ./results."""
    from .analysis.view import load_view
    from .store import StoreError, list_experiments

    if results is None:
        found = list_experiments(Path("results"))
        if not found:
            raise StoreError("results: no experiments found here (run `mhc-lab run FILE` first, or give a folder)")
        results = found[0].root
    return load_view(results)


def _not_all_drawn(views: list, failed: list[str]) -> None:
    """End `plot` and `report` with one line (exit code 1) when damaged runs were left out or
    a figure failed; the rest was drawn and written."""
    damaged = [(view, c) for view in views for c in view.damaged]
    lines = [f"{c.problem} ({c.run_id} left out)" for _, c in damaged] + [f"figure {f}" for f in failed]
    if damaged:
        then = (f"the rest is drawn; `mhc-lab check {damaged[0][0].store.root} --repair` moves damaged runs "
                "aside, `mhc-lab run` trains them again")
    else:
        then = "the other figures were drawn"
    _problems(lines, "problems", then)


def _say(line: str) -> None:
    console.print(line, style="dim" if line.startswith("skipped") else None, highlight=False, soft_wrap=True)


COMPARE_HELP = " Several folders are compared, into --out."
OUT_NEEDED = "comparing several folders needs --out DIR: where the comparison goes (no folder is its home)"


def _open_comparison(results: list[Path], out: Optional[Path]):
    """The folders of `plot`/`report` with several RESULTS, once --out is known to be given."""
    from .analysis.compare import open_comparison

    if out is None:
        raise MhcLabError(OUT_NEEDED)
    return open_comparison(results)


@app.command()
def plot(
    results: Annotated[
        Optional[list[Path]], typer.Argument(help=RESULTS_HELP + COMPARE_HELP, show_default=False)
    ] = None,
    out: Annotated[
        Optional[Path], typer.Option(help="Write the figures here instead of RESULTS/figures; required with several folders.")
    ] = None,
    format_: Annotated[FigureFormat, typer.Option("--format", help="Image format.")] = FigureFormat.png,
    smooth: Annotated[
        Optional[int],
        typer.Option(min=0, help="Moving average of the loss and gradient-norm curves over this many logged "
                     "steps, the raw curves faint; 0 = raw only. Default: automatic (runs of 500+ logged "
                     "steps get a fiftieth of their length).", show_default=False),
    ] = None,
) -> None:
    """Draw the paper's figures from a results folder, or overlay several folders' runs
    (reads the results, never trains).

    Example: mhc-lab plot results/smoke --format svg

    Example: mhc-lab plot results/growth --smooth 50

    Example: mhc-lab plot results/divergence results/divergence-native --out comparison
    """
    if results and len(results) > 1:
        from .analysis.plots.compare import plot_comparison

        with one_line_errors():
            comp = _open_comparison(results, out)
            result = plot_comparison(comp.views, comp.labels, out, format_.value, on_event=_say)
        console.print(f"{len(result.written)} comparison figures written, {len(result.skipped)} skipped ({out})",
                      highlight=False, soft_wrap=True)
        _not_all_drawn(comp.views, result.failed)
        return
    from .analysis.plots import plot_experiment

    with one_line_errors():
        view = _results_view(results[0] if results else None)
        result = plot_experiment(view, out, format_.value, on_event=_say, smooth=smooth)
    failed = f", {len(result.failed)} failed" if result.failed else ""
    console.print(f"{len(result.written)} figures written, {len(result.skipped)} skipped{failed} ({view.store.root})",
                  highlight=False, soft_wrap=True)
    _not_all_drawn([view], result.failed)


@app.command()
def report(
    results: Annotated[
        Optional[list[Path]], typer.Argument(help=RESULTS_HELP + COMPARE_HELP, show_default=False)
    ] = None,
    out: Annotated[
        Optional[Path],
        typer.Option(help="Several folders: write OUT/REPORT.md and OUT/figures/ (required with several; "
                     "one folder's report is always RESULTS/REPORT.md)."),
    ] = None,
) -> None:
    """Write RESULTS/REPORT.md: experiment, environment, runs, gains against the paper, figures;
    with several folders, one comparison of the runs they share.

    Example: mhc-lab report results/smoke

    Example: mhc-lab report results/divergence results/divergence-native --out comparison
    """
    if results and len(results) > 1:
        from .analysis.compare import write_comparison_report

        with one_line_errors():
            comp = _open_comparison(results, out)
            written = write_comparison_report(comp, out)
        console.print(written.table.rich())
        for line in written.reading:
            console.print(f"- {line}", highlight=False)
        console.print(f"wrote {written.path} ({len(written.figures.written)} figures)", highlight=False, soft_wrap=True)
        _not_all_drawn(comp.views, written.figures.failed)
        return
    from .analysis.report import write_report

    with one_line_errors():
        if out is not None:
            raise MhcLabError("--out is for comparing several folders; one folder's report is RESULTS/REPORT.md")
        view = _results_view(results[0] if results else None)
        result = write_report(view)
    for table in result.tables:
        console.print(table.rich())
    for line in result.reading:
        console.print(f"- {line}", highlight=False)
    skipped = f", {len(result.figures.skipped)} skipped" if result.figures.skipped else ""
    failed = f", {len(result.figures.failed)} failed" if result.figures.failed else ""
    console.print(f"wrote {result.path} ({len(result.figures.written)} figures{skipped}{failed})",
                  highlight=False, soft_wrap=True)
    _not_all_drawn([view], result.figures.failed)


# bench: training-step time of residual, HC and mHC (logic in mhc_lab/bench.py)


@app.command()
def bench(
    preset: Annotated[
        Optional[str],
        typer.Option(
            help="Named shape: headline (depth 45, d_model 64, batch 16 x 64: the shape of "
            "experiments/divergence.yaml) or reference (depth 12, d_model 64, 256, 512, batch 16 x 128: "
            "the defaults). Options given explicitly override it.",
            show_default=False,
        ),
    ] = None,
    d_model: Annotated[
        Optional[list[int]],
        typer.Option("--d-model", help="Width C to measure (repeatable). Default: 64, 256, 512.", show_default=False),
    ] = None,
    depth: Annotated[Optional[int], typer.Option(help="Transformer blocks (two layers each). Default: 12.", show_default=False)] = None,
    n_streams: Annotated[int, typer.Option(help="Expansion rate n of HC and mHC.")] = 4,
    batch: Annotated[Optional[int], typer.Option(help="Sequences per step. Default: 16.", show_default=False)] = None,
    seq_len: Annotated[Optional[int], typer.Option(help="Tokens per sequence. Default: 128.", show_default=False)] = None,
    steps: Annotated[int, typer.Option(help="Timed repetitions (each times one step of every variant).")] = 10,
    warmup: Annotated[int, typer.Option(help="Untimed steps per variant first.")] = 3,
    sinkhorn_iters: Annotated[int, typer.Option(help="mHC Sinkhorn iterations (paper: 20).")] = 20,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    threads: Annotated[
        Optional[int], typer.Option(help="torch CPU threads (default: torch's own choice).", show_default=False)
    ] = None,
    exact: Annotated[
        bool, typer.Option("--exact/--no-exact", help="Add rows for the exact mHC variants (mhc_lite, kromhc, ortho).")
    ] = True,
    peer: Annotated[
        bool, typer.Option("--peer/--no-peer", help="Add rows for the hyper-connections package if installed.")
    ] = True,
    compile_: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="Wrap every variant (residual and peer rows too) in torch.compile; the first, "
            "compiling step is timed separately (compile s), not in the step times. Compiling "
            "takes minutes per model at depth 12 on a CPU.",
        ),
    ] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print JSON (rows and environment) instead of a table.")] = False,
) -> None:
    """Time training steps (forward, backward, gradient norm, AdamW) of every connection, interleaved.

    Example: mhc-lab bench --preset headline --threads 1 --no-peer
    """
    from .bench import BenchSettings, render_table, run_bench, to_json

    try:
        settings = BenchSettings.from_preset(
            preset, d_models=list(d_model) if d_model else None, depth=depth, n_streams=n_streams,
            seq_len=seq_len, batch=batch, steps=steps, warmup=warmup, sinkhorn_iters=sinkhorn_iters,
            peer=peer, exact=exact, device=device, threads=threads, compile=compile_,
        )
    except MhcLabError as exc:
        fail(exc)
    try:
        rows = run_bench(settings, progress=lambda line: err_console.print(line, style="dim", highlight=False))
    except MhcLabError as exc:
        fail(exc)
    if json_:
        typer.echo(to_json(rows, settings))
    else:
        console.print(render_table(rows, settings))
