"""REPORT.md for a results folder, and its key tables for the terminal (reads only the store).

The report holds: the experiment (name, description, experiment.yaml), the environment that
produced it (versions, device, corpus and its sha256), a table of runs, the measured peak gains
per connection beside the mHC paper's (arXiv 2512.24880) with a plain-worded reading of
them, the training stability per run (gradient-norm spikes before clipping, the largest loss
surge), the figures (drawn by plots/ when missing or older than the results), and the diverged,
failed and unfinished runs with their step and reason. Runs whose files fail their integrity
check (store/integrity.py) are left out of every table and figure and listed in a section of
their own.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from rich.table import Table

from .. import __version__
from .plots import PlotResult, caption, figure_title, plot_experiment
from .plots.style import NAMES, PAPER_GAIN, fmt_number, is_pair, representative_runs
from ..probe.constraint import FAILED_LAYER
from .derived import bound_breaker_rows, growth_rows, last_gain, schedule_phase
from .view import DEAD_STEPS, SPIKE_FACTOR, ExperimentView, RunView, axis_name, describe, short_name
from ..store import StoreError, as_float, atomic_write_text, unwritable

REPORT_NAME = "REPORT.md"
PAPER_TEXT = {"residual": "1 (by construction)", "hc": "≈ 3000", "mhc": "≤ ≈ 1.6 (forward 1 by construction)",
              "mhc_tol": "≤ ≈ 1.6 (forward 1 by construction)",
              "mhc_lite": "1 (exact by construction)", "kromhc": "1 (exact by construction)",
              "ortho": "1 (exact by construction, to rounding)"}
ENVIRONMENT_KEYS = (
    ("mhc_lab", "mhc-lab"), ("torch", "torch"), ("python", "Python"), ("platform", "platform"),
    ("device", "device"), ("threads", "CPU threads"), ("corpus", "corpus"),
    ("corpus_sha256", "corpus sha256"), ("corpus_bytes", "corpus bytes"), ("corpus_files", "corpus files"),
)
GAIN_DEFINITION = (
    "Gain is the paper's Amax gain magnitude of the composite residual mapping: the largest "
    "|row sum| (forward, P_l = H_l...H_0) or |column sum| (backward, S_l = H_(L-1)...H_l), per "
    "probe token, averaged over the probe's tokens; a run's peak is the largest over layers, "
    "probes and both directions. The infinity-norm variant sums absolute values instead."
)


@dataclass
class TableData:
    """A table as strings, rendered to Markdown for the report or to rich for the terminal."""

    title: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    text_columns: int = 1  # the first columns hold text (left-aligned); the rest numbers
    text_last: bool = False  # the last column holds text too

    def _left(self, index: int) -> bool:
        return index < self.text_columns or (self.text_last and index == len(self.headers) - 1)

    def markdown(self) -> str:
        align = ["---" if self._left(i) else "--:" for i in range(len(self.headers))]
        lines = [self.headers, align, *self.rows]
        return "\n".join("| " + " | ".join(_md_cell(c) for c in line) + " |" for line in lines) + "\n"

    def rich(self) -> Table:
        table = Table(title=self.title)
        for i, header in enumerate(self.headers):
            table.add_column(header, justify="left" if self._left(i) else "right")
        for row in self.rows:
            table.add_row(*row)
        return table


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _num(value, fmt: Callable[[float], str] = fmt_number) -> str:
    number = as_float(value)
    return "-" if math.isnan(number) else fmt(number)


# -- tables --------------------------------------------------------------------------------

RUN_COLUMNS: tuple[tuple[str, str, Callable[[RunView], str]], ...] = (
    ("run_id", "run", lambda r: r.run_id),
    ("connection", "connection", lambda r: r.connection),
    ("status", "status", lambda r: r.status),
    ("depth", "depth", lambda r: _num(r.summary.get("depth"), lambda v: f"{v:g}")),
    ("layers", "layers", lambda r: _num(r.summary.get("layers"), lambda v: f"{v:g}")),
    ("d_model", "C", lambda r: _num(r.summary.get("d_model"), lambda v: f"{v:g}")),
    ("n_streams", "n", lambda r: _num(r.summary.get("n_streams"), lambda v: f"{v:g}")),
    ("sinkhorn_iters", "t_max", lambda r: _num(r.summary.get("sinkhorn_iters"), lambda v: f"{v:g}")),
    ("lr", "lr", lambda r: _num(r.summary.get("lr"), lambda v: f"{v:g}")),
    ("seed", "seed", lambda r: str(r.seed)),
    ("n_params", "params", lambda r: _num(r.summary.get("n_params"), lambda v: f"{v:,.0f}")),
    ("steps_done", "steps", lambda r: _num(r.summary.get("steps_done"), lambda v: f"{v:g}")),
    ("final_loss", "final loss", lambda r: _num(r.summary.get("final_loss"), lambda v: f"{v:.3f}")),
    ("final_val_loss", "val loss", lambda r: _num(r.summary.get("final_val_loss"), lambda v: f"{v:.3f}")),
    ("max_gain_fwd", "peak gain fwd", lambda r: _num(r.summary.get("max_gain_fwd"))),
    ("max_gain_bwd", "peak gain bwd", lambda r: _num(r.summary.get("max_gain_bwd"))),
    ("max_gain_step", "@step", lambda r: _num(r.summary.get("max_gain_step"), lambda v: f"{v:g}")),
    ("max_gain_layer", "@layer", lambda r: _num(r.summary.get("max_gain_layer"), lambda v: f"{v:g}")),
    ("final_gain_fwd", "final gain fwd", lambda r: _num(last_gain(r, "fwd"))),
    ("final_gain_bwd", "final gain bwd", lambda r: _num(last_gain(r, "bwd"))),
    ("max_signal_growth", "signal growth", lambda r: _num(r.summary.get("max_signal_growth"))),
    ("wall_s", "wall s", lambda r: _num(r.summary.get("wall_s"), lambda v: f"{v:.1f}")),
)
SUMMARY_KEYS = {"model.depth", "model.d_model", "model.n_streams", "model.sinkhorn_iters", "train.lr"}


def runs_table(view: ExperimentView) -> TableData:
    """Every finished run: its settings (plus any other swept key) and its outcome."""
    columns = [c for c in RUN_COLUMNS if c[0] != "sinkhorn_iters" or "mhc" in {r.connection for r in view.runs}]
    extra = [k for k in view.axes if k not in SUMMARY_KEYS]
    headers = [h for _, h, _ in columns[:3]] + [short_name(k) for k in extra] + [h for _, h, _ in columns[3:]]
    table = TableData(f"{view.name}: runs", headers, text_columns=3)
    for run in view.runs:
        cells = [get(run) for _, _, get in columns]
        settings = ["-" if run.setting(k) is None else str(run.setting(k)) for k in extra]
        table.rows.append(cells[:3] + settings + cells[3:])
    return table


def gains_table(view: ExperimentView) -> TableData:
    """Per connection: the largest measured peak composite gain beside the paper's value."""
    table = TableData(
        f"{view.name}: peak composite gain, measured vs the mHC paper (27B, 60 layers)",
        ["connection", "largest at", "runs", "largest peak gain", "range over runs",
         "inf-norm variant", "paper"], text_columns=2, text_last=True)
    for conn in view.connections:
        runs = [r for r in view.plottable if r.connection == conn]
        best = _best(runs)
        gains = [r.peak_gain for r in runs if not math.isnan(r.peak_gain)]
        inf_norm = [max(r.number("max_gain_fwd_inf"), r.number("max_gain_bwd_inf")) for r in runs]
        table.rows.append([
            NAMES[conn], _where(best) if best else "-", str(len(runs)),
            _num(best.peak_gain) if best else "-",
            _range(gains),
            _num(max((g for g in inf_norm if not math.isnan(g)), default=float("nan"))),
            PAPER_TEXT[conn],
        ])
    return table


STABILITY_DEFINITION = (
    "Measured from the end of warmup on (the figures show every step). Gradient norms are taken "
    f"before clipping; a spike is a step above {SPIKE_FACTOR:g}x the run's median gradient norm over "
    "those steps. The loss rise is the largest excess of the training loss over its running minimum "
    "(a loss surge; per-batch noise alone gives a few tenths). A run is dead from the step (warmup "
    f"included) from which its gradient norm is exactly 0 at every later logged step, at least "
    f"{DEAD_STEPS} of them: it cannot train any more; its spikes count only the steps before."
)


def stability_table(view: ExperimentView) -> TableData:
    """Per run: largest gradient norm, number of spikes, largest loss surge, validation loss and
    the step from which the run is dead (if it is)."""
    table = TableData(f"{view.name}: training stability", [
        "run", "connection", "max grad norm", "@step", "grad spikes", "largest loss rise", "@step",
        "val loss", "dead from"], text_columns=2)
    for run in view.plottable:
        s = run.stability
        if s is None:
            continue
        table.rows.append([
            run.run_id, run.connection, fmt_number(s.max_grad_norm), str(s.grad_step), str(s.grad_spikes),
            f"{s.loss_rise:.2f}", str(s.rise_step), _num(run.summary.get("final_val_loss"), lambda v: f"{v:.3f}"),
            "-" if s.dead_from is None else str(s.dead_from),
        ])
    return table


def stability_reading(view: ExperimentView) -> list[str]:
    """Per connection, the medians over its runs of the stability measures and the val loss,
    and which of its runs are dead."""
    lines = []
    for conn in view.connections:
        runs = [r for r in view.plottable if r.connection == conn and r.stability is not None]
        if not runs:
            continue
        med = lambda values: fmt_number(float(np.median(values)))  # noqa: E731
        val = [as_float(r.summary.get("final_val_loss")) for r in runs]
        val = [v for v in val if not math.isnan(v)]
        lines.append(
            f"{NAMES[conn]} ({len(runs)} run{'s, medians' if len(runs) > 1 else ''}): largest gradient norm "
            f"{med([r.stability.max_grad_norm for r in runs])}, gradient-norm spikes "
            f"{med([r.stability.grad_spikes for r in runs])}, largest loss rise "
            f"{float(np.median([r.stability.loss_rise for r in runs])):.2f}"
            + (f", final validation loss {float(np.median(val)):.3f}." if val else ".")
        )
        dead = [r for r in runs if r.stability.dead_from is not None]
        if dead:
            lines.append(
                f"{NAMES[conn]}: {len(dead)} of {len(runs)} run{'s' if len(runs) > 1 else ''} dead "
                "(gradient exactly 0 from then on): "
                + ", ".join(f"{r.run_id} from step {r.stability.dead_from}, final loss "
                            f"{as_float(r.summary.get('final_loss')):.3f}" for r in dead)
                + f" (uniform prediction: ln 256 = {math.log(256):.3f})."
            )
    return lines


BREAKERS_DEFINITION = (
    "For every mHC-family run whose peak composite backward gain exceeds the paper's 1.6: the "
    "layers with the largest single-layer backward gain (largest |column sum| of one H_res, worst "
    "probe token), every one above 1.5 and then the next largest while the composite stays "
    "above 1.6 (at most 5), and the composite gain with them replaced by the identity in the "
    "saved peak H_res (hres.npz). A violation that disappears with one or two layers replaced "
    "comes from those layers' matrices, not from a small error multiplied over depth."
)


def breakers_table(view: ExperimentView) -> TableData:
    """Which layers break the 1.6 bound, per mHC-family run above it (derived.py)."""
    table = TableData(f"{view.name}: which layers break the bound", [
        "run", "connection", "peak gain bwd", "@step", "layers (single-layer gain)",
        "composite without them"], text_columns=2)
    for row in bound_breaker_rows(view):
        layers = ", ".join(f"{k} ({fmt_number(g)})" for k, g in zip(row.breakers.layers, row.breakers.single_gains))
        table.rows.append([row.run.run_id, row.run.connection, fmt_number(row.peak_bwd),
                           str(row.run.summary.get("max_gain_step")), layers or "-",
                           fmt_number(row.breakers.after)])
    return table


GROWTH_DEFINITION = (
    "For every run whose composite gain (the larger of forward and backward, token mean) passed "
    "the paper's 3000 at a probe: the first probe step above 3000, the share of the probes from "
    "the end of warmup on that stayed above it, the peak and where it fell in the learning-rate "
    "schedule, and the growth rate of log10(gain) per 100 steps up to the peak, from step 0 and "
    "from the end of warmup (least-squares fits over the probes)."
)


def growth_table(view: ExperimentView) -> TableData:
    """When and for how long each run's gain stayed past 3000 (derived.py)."""
    table = TableData(f"{view.name}: gain past 3000 over training", [
        "run", "connection", "first step > 3000", "share of probes > 3000 after warmup", "peak gain",
        "peak step", "in the schedule", "log10 gain / 100 steps to the peak: from 0", "from warmup's end"],
        text_columns=2)
    for row in growth_rows(view):
        table.rows.append([
            row.run.run_id, row.run.connection, str(row.first_above), f"{row.share_above:.0%}",
            fmt_number(row.peak_gain), str(row.peak_step), schedule_phase(row.peak_step, row.warmup, row.steps),
            "-" if math.isnan(row.slope) else f"{100 * row.slope:.2f}",
            "-" if math.isnan(row.slope_after_warmup) else f"{100 * row.slope_after_warmup:.2f}",
        ])
    return table


def problems_table(view: ExperimentView) -> TableData:
    """Diverged, failed and unfinished runs with the step where they stopped and why."""
    table = TableData(f"{view.name}: runs that did not complete", ["run", "status", "step", "reason"],
                      text_columns=2, text_last=True)
    for run in view.runs:
        if run.status in ("diverged", "failed"):
            step = run.summary.get("diverged_step")
            table.rows.append([run.run_id, run.status, "-" if step is None else str(step),
                               str(run.summary.get("reason") or "-")])
    for run_id in view.unfinished:
        table.rows.append([run_id, "unfinished", "-",
                           "no summary.json yet: still running, or interrupted (rerun to resume)"])
    return table


def damaged_table(view: ExperimentView) -> TableData:
    """Runs whose files fail their integrity check: the file and what is wrong."""
    table = TableData(f"{view.name}: damaged runs (left out)", ["run", "damage"], text_columns=2)
    for check in view.damaged:
        table.rows.append([check.run_id, check.problem])
    return table


def _range(values: list[float]) -> str:
    if not values:
        return "-"
    low, high = fmt_number(min(values)), fmt_number(max(values))
    return low if low == high else f"{low} - {high}"


def _best(runs: list[RunView]) -> Optional[RunView]:
    ranked = [r for r in runs if not math.isnan(r.peak_gain)]
    return max(ranked, key=lambda r: r.peak_gain) if ranked else None


def _where(run: RunView) -> str:
    where = f"{run.run_id}, step {run.summary.get('max_gain_step')}, layer {run.summary.get('max_gain_layer')}"
    if run.status == "diverged":
        where += f"; the run diverged at step {run.summary.get('diverged_step')}"
    return where


# -- the reading of the numbers ------------------------------------------------------------


def reading(view: ExperimentView) -> list[str]:
    """Plain sentences comparing the measured gains with the paper's, without overclaiming."""
    lines = []
    best = {c: _best([r for r in view.plottable if r.connection == c]) for c in view.connections}
    if best.get("hc"):
        lines.append(_hc_sentence(best["hc"]))
    for series in ("mhc", "mhc_tol"):
        if best.get(series):
            lines += _mhc_sentences(view, best[series])
    lines += _exact_sentences(view, best)
    if best.get("residual"):
        if math.isclose(best["residual"].peak_gain, 1.0, rel_tol=1e-6):
            lines.append("The residual baseline's gain is 1 by construction (its H_res is the constant 1), "
                         "not a measurement; it checks the probe.")
        else:
            lines.append(f"The residual baseline's gain is {fmt_number(best['residual'].peak_gain)}, "
                         "not 1: with n = 1 and H_res = 1 it must be exactly 1, so check the probe.")
    growth = {c: [r.number("max_signal_growth") for r in view.plottable if r.connection == c] for c in view.connections}
    growth = {c: [g for g in v if not math.isnan(g)] for c, v in growth.items()}
    if any(growth.values()):
        baseline = ("; the plain residual's own growth (its sublayers' outputs summed onto a small embedding) "
                    "is the baseline to compare with" if growth.get("residual") else "")
        lines.append("The residual signal itself (RMS of the hidden state over the embedding's, largest over "
                     "layers and probes) grew at most " + ", ".join(
                         f"{fmt_number(max(v))} times for {NAMES[c]}" for c, v in growth.items() if v)
                     + baseline + " (figure signal_by_layer).")
    pair = representative_runs(view)
    if is_pair(view, pair) and 0 < pair["mhc"].peak_gain < math.inf and math.isfinite(pair["hc"].peak_gain):
        ratio = pair["hc"].peak_gain / pair["mhc"].peak_gain
        settings = describe({k: pair["hc"].setting(k) for k in view.axes if pair["hc"].setting(k) is not None})
        lines.append(f"At the same settings{f' ({settings})' if settings else ''} and seed {pair['hc'].seed}, "
                     f"HC's peak gain is {fmt_number(ratio)} times mHC's.")
    return lines


def _hc_sentence(run: RunView) -> str:
    gain, paper = run.peak_gain, PAPER_GAIN["hc"]
    where = f"({_where(run)})"
    context = "the paper's ≈ 3000 came from a 27B model with 60 layers trained for 50k steps (mHC paper, arXiv 2512.24880)"
    if math.isinf(gain):
        return (f"HC's composite gain overflowed float64 {where}: unbounded amplification, far past the "
                "paper's ≈ 3000.")
    if gain >= paper / 3:
        verb = "exceeds the paper's ≈ 3000" if gain > paper else "reaches the paper's order of magnitude (≈ 3000)"
        return f"HC's peak composite gain, {fmt_number(gain)} {where}, {verb}. The scales differ: {context}."
    if gain >= 10:
        return (f"HC amplified clearly, up to {fmt_number(gain)} {where}, but {fmt_number(paper / gain)} times "
                f"below the paper's ≈ 3000; {context}.")
    return (f"HC barely amplified (peak {fmt_number(gain)} {where}): this sweep is too small or too short to "
            f"show the paper's blow-up, so it neither confirms nor contradicts ≈ 3000; {context}.")


def _mhc_sentences(view: ExperimentView, run: RunView) -> list[str]:
    gain, bound = run.peak_gain, PAPER_GAIN["mhc"]
    construction = ("Its forward gain is 1 by construction (every Sinkhorn-Knopp iteration ends by "
                    "normalising the rows); the column sums, and so the backward gain, are what is measured.")
    if gain <= bound:
        first = (f"{NAMES[run.connection]} stayed within the paper's bound: its largest peak composite gain is "
                 f"{fmt_number(gain)} ({_where(run)}) against ≤ ≈ 1.6 in the paper. {construction}")
    else:
        first = f"{NAMES[run.connection]} exceeded the paper's ≈ 1.6: {fmt_number(gain)} ({_where(run)}). {construction}"
        found = next((row for row in bound_breaker_rows(view) if row.run is run), None)
        if found is not None and found.breakers.layers:
            pairs = list(zip(found.breakers.layers, found.breakers.single_gains))
            failed = [f"{k} ({fmt_number(g)})" for k, g in pairs if g > FAILED_LAYER]
            others = [f"{k} ({fmt_number(g)})" for k, g in pairs if g <= FAILED_LAYER]
            if failed:
                first += (f" The saved peak H_res puts the cause in single layers: layer(s) {', '.join(failed)} "
                          "have a column summing to about that much for their worst token (a single layer's "
                          "backward gain), where t_max iterations did not balance near-permutation logits.")
            if others:
                first += (f" {'Further' if failed else 'The largest'} single-layer backward gains: layer(s) "
                          f"{', '.join(others)}.")
            first += (f" With these layers replaced by the identity the composite is "
                      f"{fmt_number(found.breakers.after)} (table \"Which layers break the bound\").")
    moved = _mhc_movement(view, run.connection)
    if moved is None:
        return [first]
    change, col_err = moved
    if change < 1e-2:
        second = (f"Caution: {NAMES[run.connection]}'s H_res hardly moved during training (its distance from I changed by at most "
                  f"{fmt_number(change)}), so a gain near 1 may only mean H_res stayed at its initialisation.")
    else:
        second = (f"{NAMES[run.connection]}'s H_res moved during training (a layer's mean distance from I changed by up to "
                  f"{fmt_number(change)}), so the bound reflects the constraint, not a frozen H_res; worst "
                  f"|column sum - 1| at the last probe: {fmt_number(col_err)}.")
    return [first, second]


def _exact_sentences(view: ExperimentView, best: dict[str, Optional[RunView]]) -> list[str]:
    """One sentence per exact variant present: its bound holds by construction; the measured
    peak shows float rounding only (or, if not, a problem to look into)."""
    lines = []
    for conn in ("mhc_lite", "kromhc", "ortho"):
        run = best.get(conn)
        if run is None:
            continue
        gain = run.peak_gain
        if gain <= 1.001:
            lines.append(f"{NAMES[conn]}'s H_res is doubly stochastic by construction; its largest measured peak "
                         f"composite gain, {fmt_number(gain)} ({_where(run)}), is 1 to float rounding.")
        else:
            lines.append(f"{NAMES[conn]}'s H_res should be doubly stochastic by construction, yet its peak "
                         f"composite gain is {fmt_number(gain)} ({_where(run)}): check its column-sum error.")
    return lines


def _mhc_movement(view: ExperimentView, series: str = "mhc") -> Optional[tuple[float, float]]:
    """Over the runs of an mHC series: the largest change of a layer's mean distance from I
    between the first and last probe, and the largest |column sum - 1| at the last probe."""
    changes, errors = [], []
    for run in view.plottable:
        if run.connection != series or len(run.probes) < 2 or "hres" not in run.probes[0]:
            continue
        first, last = run.probes[0]["hres"], run.probes[-1]["hres"]
        changes += [abs(as_float(b) - as_float(a)) for a, b in zip(first["identity_dist"], last["identity_dist"])]
        errors += [as_float(e) for e in last["col_sum_err"]]
    if not changes:
        return None
    return max(changes), max(errors, default=float("nan"))


# -- the report ----------------------------------------------------------------------------


def environment_table(view: ExperimentView) -> TableData:
    """Versions, device and data of the runs; differing values across runs are all listed."""
    table = TableData("environment", ["", "value"], text_columns=2)
    envs = [r.summary.get("environment") or {} for r in view.runs]
    for key, label in ENVIRONMENT_KEYS:
        values = list(dict.fromkeys(str(e[key]) for e in envs if e.get(key) is not None))
        if values:
            value = " / ".join(values) + (" (differs between runs)" if len(values) > 1 else "")
            table.rows.append([label, f"`{value}`" if key == "corpus_sha256" else value])
    return table


def build_report(view: ExperimentView, figures: PlotResult) -> str:
    """The text of REPORT.md."""
    parts = [f"# {view.name}\n", f"{view.description}\n" if view.description else "",
             f"Results folder `{view.store.root}`: {len(view.runs)} finished runs"
             f"{f', {len(view.damaged)} damaged (left out)' if view.damaged else ''}"
             f"{f', {len(view.unfinished)} unfinished' if view.unfinished else ''}. "
             f"Report written by mhc-lab {__version__} on {time.strftime('%Y-%m-%d %H:%M')}.\n",
             "## Experiment\n", f"```yaml\n{view.experiment_text.rstrip()}\n```\n"]
    swept = ", ".join(axis_name(k) for k in view.axes)
    parts.append(f"Swept: connection{', seed' if len(view.seeds) > 1 else ''}{', ' + swept if swept else ''}.\n")
    env = environment_table(view)
    parts += ["## Environment\n", env.markdown() if env.rows else "No run recorded its environment.\n"]
    parts += ["## Runs\n", runs_table(view).markdown()]
    parts += ["## Peak gain: measured vs the paper\n", gains_table(view).markdown() if view.plottable else
              "No run has gains to report.\n", GAIN_DEFINITION + "\n"]
    parts.append("".join(f"- {line}\n" for line in reading(view)))
    stable = stability_table(view)
    if stable.rows:
        parts += ["## Training stability after warmup: gradient-norm spikes, loss surges, dead runs\n", stable.markdown(),
                  STABILITY_DEFINITION + "\n", "".join(f"- {line}\n" for line in stability_reading(view))]
    growth = growth_table(view)
    if growth.rows:
        parts += ["## The gain over training\n", growth.markdown(), GROWTH_DEFINITION + "\n"]
    breakers = breakers_table(view)
    if breakers.rows:
        parts += ["## Which layers break the bound\n", breakers.markdown(), BREAKERS_DEFINITION + "\n"]
    parts += ["## Figures\n", *_figure_sections(view, figures)]
    if view.damaged:
        parts += ["## Damaged runs, left out of this report\n", damaged_table(view).markdown(),
                  "Their files differ from what the runs wrote (`mhc-lab check` explains the record); "
                  "`mhc-lab check --repair` moves them aside and `mhc-lab run` trains them again.\n"]
    problems = problems_table(view)
    parts += ["## Diverged, failed and unfinished runs\n",
              problems.markdown() if problems.rows else "None: every run completed.\n"]
    return "\n".join(p for p in parts if p)


def _figure_sections(view: ExperimentView, figures: PlotResult) -> list[str]:
    sections = []
    for path in figures.written:
        link = path.relative_to(view.store.root).as_posix()
        sections.append(f"### {figure_title(path.stem)}\n\n{caption(path.stem)}\n\n![{path.stem}]({link})\n")
    if figures.skipped:
        sections.append("Not drawn (no data for them in this sweep):\n\n"
                        + "".join(f"- {s}\n" for s in figures.skipped))
    if figures.failed:
        sections.append("Not drawn (the figure failed; the others are unaffected):\n\n"
                        + "".join(f"- {s}\n" for s in figures.failed))
    return sections or ["No figures.\n"]


@dataclass
class ReportResult:
    """What `write_report` produced: the report file, the figures, the terminal tables."""

    path: Path
    figures: PlotResult
    tables: list[TableData]
    reading: list[str]


def write_report(view: ExperimentView, on_event: Callable[[str], None] = lambda line: None) -> ReportResult:
    """Draw missing or stale figures into <results>/figures (PNG) and write <results>/REPORT.md
    (StoreError, one line, before drawing anything if the folder cannot be written)."""
    problem = unwritable(view.store.root)
    if problem is not None:
        raise StoreError(f"{problem}: cannot write {REPORT_NAME} and its figures there")
    figures = plot_experiment(view, view.store.root / "figures", "png", keep_fresh=True, on_event=on_event)
    path = view.store.root / REPORT_NAME
    atomic_write_text(path, build_report(view, figures))
    tables = [gains_table(view)] if view.plottable else []
    problems = problems_table(view)
    if problems.rows:
        tables.append(problems)
    if view.damaged:
        tables.append(damaged_table(view))
    return ReportResult(path, figures, tables, reading(view))
