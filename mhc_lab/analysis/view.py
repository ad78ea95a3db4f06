"""A results folder read into tidy per-run records for plots and reports (never trains).

`load_view(path)` opens an experiment folder written by `mhc-lab run` (see store.py for the
files) and returns an `ExperimentView`: one `RunView` per finished run (summary row, resolved
config flattened to dotted keys, metrics, probes and hres.npz loaded on demand) and the
experiment's swept axes, derived from the runs' resolved configs rather than from the sweep
section, so `--set` overrides and explicit points are covered too.

A setting a connection ignores (e.g. `model.n_streams` for `residual`, `model.sinkhorn_iters`
for `hc`) reads as None for that run: such a run matches every value of that axis, which is
how a residual baseline is shared by all the HC/mHC runs at its depth.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import yaml

from ..experiment.config import CONNECTIONS, IRRELEVANT_MODEL_FIELDS
from ..store import (
    ExperimentStore, RunCheck, RunFiles, StoreError, as_float, check_store, open_results, peak_gain, read_jsonl,
)

CONNECTION = "model.connection"
TOLERANCE = "model.sinkhorn_tol"
SERIES_KEYS = {"model.sinkhorn_iters", TOLERANCE}  # settings that can define a series (mhc_tol)
# The series runs are drawn in: the connections, with mHC to a tolerance its own series.
SERIES: tuple[str, ...] = (*CONNECTIONS[:3], "mhc_tol", *CONNECTIONS[3:])
SEED = "seed"
DEPTH = "model.depth"
# Keys that never make a run different from the science's point of view.
IGNORED_KEYS = {"probe.checkpoint", "train.threads", "train.device", "train.compile"}
# Short names for titles (`depth=4, n=2`) and long ones with units for axis labels.
SHORT_NAMES = {
    "model.depth": "depth", "model.d_model": "C", "model.n_streams": "n",
    "model.sinkhorn_iters": "t_max", "model.mhc_init_logit": "mHC init", "train.lr": "lr",
    "train.steps": "steps", "train.batch_size": "batch", "train.seq_len": "seq_len",
}
AXIS_NAMES = {
    "model.depth": "depth (transformer blocks)",
    "model.d_model": "width C (per stream)",
    "model.n_streams": "expansion rate n (streams)",
    "model.sinkhorn_iters": "Sinkhorn iterations t_max",
    "model.mhc_init_logit": "mHC init logit strength",
    "train.lr": "peak learning rate",
    "train.steps": "training steps",
    "train.batch_size": "batch size (sequences)",
    "train.seq_len": "sequence length (bytes)",
}


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """{'model': {'depth': 2}} -> {'model.depth': 2}."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def axis_name(key: str) -> str:
    """An axis label (with units) for a dotted config key."""
    return AXIS_NAMES.get(key, key)


def short_name(key: str) -> str:
    """A short name for a dotted config key, for titles: `model.n_streams` -> `n`."""
    return SHORT_NAMES.get(key, key.split(".")[-1])


def format_value(value: Any) -> str:
    """A config value for a label: 0.003 -> '0.003', 1e-05 -> '1e-05', True -> 'true'."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def describe(settings: dict[str, Any]) -> str:
    """'depth=4, n=2' for a facet or the fixed part of a config."""
    return ", ".join(f"{short_name(k)}={format_value(v)}" for k, v in settings.items())


@dataclass
class RunView:
    """One finished run: its summary row, resolved config and (lazily) its logs."""

    files: RunFiles
    summary: dict
    config: dict[str, Any]

    @property
    def run_id(self) -> str:
        return self.files.run_id

    @property
    def status(self) -> str:
        return self.summary.get("status", "unknown")

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    @property
    def model_connection(self) -> str:
        """`model.connection` of the run: residual, hc, mhc, mhc_lite, kromhc or ortho."""
        return self.summary.get("connection") or self.config.get(CONNECTION, "?")

    @property
    def connection(self) -> str:
        """The series the run is drawn and tabulated in: its `model.connection`, except that
        mHC iterated to a tolerance (model.sinkhorn_tol set) is its own series, `mhc_tol`."""
        conn = self.model_connection
        if conn == "mhc" and self.config.get(TOLERANCE) is not None:
            return "mhc_tol"
        return conn

    @property
    def seed(self) -> int:
        return int(self.config.get(SEED, self.summary.get("seed", 0)))

    def setting(self, key: str) -> Any:
        """The run's value of a dotted config key; None where its connection ignores it."""
        section, _, name = key.partition(".")
        if section == "model" and name in IRRELEVANT_MODEL_FIELDS.get(self.model_connection, ()):
            return None
        return self.config.get(key)

    def number(self, key: str) -> float:
        """A numeric summary field as float (None, '' and 'inf'/'nan' strings handled)."""
        return as_float(self.summary.get(key))

    @property
    def peak_gain(self) -> float:
        """The run's headline: largest composite gain, forward or backward (nan if none)."""
        return peak_gain(self.summary)

    @cached_property
    def metrics(self) -> list[dict]:
        return read_jsonl(self.files.metrics)

    @cached_property
    def probes(self) -> list[dict]:
        return read_jsonl(self.files.probes)

    def metric(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of one training metric (loss, grad_norm, lr, tokens_per_s)."""
        rows = [m for m in self.metrics if name in m]
        return _arrays(rows, lambda m: m[name])

    @cached_property
    def stability(self) -> Optional[Stability]:
        """Gradient-norm spikes and the largest loss surge after warmup (see `Stability`)."""
        steps, loss = self.metric("loss")
        _, grad_norm = self.metric("grad_norm")
        if len(steps) != len(grad_norm):
            return None
        return stability(steps, loss, grad_norm, int(self.config.get("train.warmup") or 0))

    def probe_series(self, pick) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of `pick(probe_record)` over the run's probes."""
        return _arrays(self.probes, pick)

    def peak_probe(self) -> Optional[dict]:
        """The probe at the run's peak-gain step (the one hres.npz `peak` holds)."""
        if not self.probes:
            return None
        step = self.summary.get("max_gain_step")
        for record in self.probes:
            if record.get("step") == step:
                return record
        return max(self.probes, key=lambda r: as_float(r["headline"]["max_gain"]))

    def load_hres(self) -> Optional[dict[str, np.ndarray]]:
        """hres.npz: `peak` and `final` H_res [layers, tokens, n, n] with `peak_step` and
        `final_step`; None if the run saved none."""
        return self.files.load_hres() if self.files.hres.exists() else None


@dataclass(frozen=True)
class Stability:
    """How unsteady one run's training was after warmup, from the steps in its metrics log
    (every step by default; with `train.log_every` > 1 only the logged ones count).

    Only steps from the end of warmup on count (the learning rate at its peak), so the
    initial descent from ln 256 and its large early gradients are not called spikes.

    - `max_grad_norm` (at `grad_step`): the largest gradient norm before clipping.
    - `grad_spikes`: steps whose gradient norm exceeds `SPIKE_FACTOR` x the median over these
      steps (those before `dead_from` in a dead run: its zero gradients are no baseline).
    - `loss_rise` (at `rise_step`): the largest rise of the training loss above its running
      minimum (taken over all earlier steps), max_t (loss_t - min_{s<t} loss_s): a loss surge,
      whatever level it starts from (batch noise alone gives a few tenths).
    - `dead_from`: the first logged step (warmup included) from which the gradient norm is
      exactly 0 at every remaining logged step, at least `DEAD_STEPS` of them; None if the run
      never froze. Such a network cannot train any more (docs/results.md: HC's overflowing stream).
    """

    max_grad_norm: float
    grad_step: int
    grad_spikes: int
    loss_rise: float
    rise_step: int
    dead_from: Optional[int] = None


SPIKE_FACTOR = 10.0
DEAD_STEPS = 2


def dead_from(steps: np.ndarray, grad_norm: np.ndarray) -> Optional[int]:
    """The first step of the trailing run of exactly-zero gradient norms (at least
    `DEAD_STEPS` logged steps long), or None."""
    alive = np.nonzero(grad_norm != 0)[0]  # NaN counts as alive: a diverged step is not frozen
    first = int(alive[-1]) + 1 if len(alive) else 0
    if len(steps) - first < DEAD_STEPS:
        return None
    return int(steps[first])


def stability(steps: np.ndarray, loss: np.ndarray, grad_norm: np.ndarray, start: int) -> Optional[Stability]:
    """The `Stability` of a run's per-step logs from step `start` on (None without such steps).

    A non-finite loss or gradient norm (a diverged step) counts as infinite: the run's largest
    gradient norm or loss rise is then inf, at that step.
    """
    loss = np.where(np.isfinite(loss), loss, np.inf)
    grad_norm = np.where(np.isfinite(grad_norm), grad_norm, np.inf)
    after = np.nonzero(steps >= start)[0]
    later = after[after >= 1]  # a rise needs an earlier step
    if len(later) == 0:
        return None
    dead = dead_from(steps, grad_norm)
    grads = grad_norm[after]
    g = after[int(np.argmax(grads))]
    live = grad_norm[after[steps[after] < dead]] if dead is not None else grads
    spikes = int((live > SPIKE_FACTOR * np.median(live)).sum()) if len(live) else 0
    rises = loss[later] - np.minimum.accumulate(loss)[later - 1]
    rises = np.where(np.isnan(rises), np.inf, rises)  # inf - inf: non-finite from the start
    r = later[int(np.argmax(rises))]
    return Stability(
        float(grad_norm[g]), int(steps[g]), spikes, float(rises.max()), int(steps[r]), dead
    )


def _arrays(rows: Iterable[dict], pick) -> tuple[np.ndarray, np.ndarray]:
    rows = list(rows)
    steps = np.array([r["step"] for r in rows], dtype=float)
    values = np.array([as_float(pick(r)) for r in rows], dtype=float)
    return steps, values


@dataclass
class ExperimentView:
    """An experiment folder: runs, swept axes and what the report needs to say about it."""

    store: ExperimentStore
    runs: list[RunView]
    unfinished: list[str] = field(default_factory=list)
    resolved: dict = field(default_factory=dict)
    damaged: list[RunCheck] = field(default_factory=list)  # left out of `runs`: files fail their check

    @property
    def name(self) -> str:
        return self.resolved.get("name") or self.store.name

    @property
    def description(self) -> str:
        return (self.resolved.get("description") or "").strip()

    @property
    def experiment_text(self) -> str:
        return self.store.experiment_yaml.read_text(encoding="utf-8")

    @property
    def plottable(self) -> list[RunView]:
        """Runs with data to draw: every finished run except the failed ones."""
        return [r for r in self.runs if not r.failed]

    @property
    def connections(self) -> list[str]:
        """The series present (`RunView.connection`), in the fixed order of SERIES."""
        present = {r.connection for r in self.plottable}
        return [c for c in SERIES if c in present]

    @property
    def seeds(self) -> list[int]:
        return sorted({r.seed for r in self.plottable})

    @cached_property
    def axes(self) -> dict[str, list]:
        """Swept config keys (besides connection and seed) -> their sorted distinct values,
        over the runs with data (all runs if every run failed); depth first."""
        runs = self.plottable or self.runs
        keys = sorted({k for r in runs for k in r.config} - IGNORED_KEYS - {CONNECTION, SEED})
        axes = {}
        for key in keys:
            values = _distinct(r.setting(key) for r in runs)
            if len(values) > 1 and not _follows_series(runs, key):
                axes[key] = values
        return dict(sorted(axes.items(), key=lambda kv: (kv[0] != DEPTH, kv[0])))

    def numeric_axes(self) -> list[str]:
        return [k for k, vs in self.axes.items() if all(_is_number(v) for v in vs)]

    def tied(self, key: str, to: Sequence[str]) -> bool:
        """Whether `key` is a function of the settings `to` over the runs (e.g. heads swept
        together with width): then it adds no axis of its own beside them."""
        seen: dict[tuple, Any] = {}
        for run in self.plottable:
            value = run.setting(key)
            if value is None:
                continue
            anchor = tuple(run.setting(k) for k in to)
            if seen.setdefault(anchor, value) != value:
                return False
        return True

    def fixed(self) -> dict[str, Any]:
        """The main settings every run shares: what the figures hold fixed (for titles)."""
        keys = ["model.d_model", "model.depth", "model.n_streams", "model.sinkhorn_iters",
                "train.lr", "train.steps", "train.batch_size", "train.seq_len"]
        out = {}
        for key in keys:
            if key in self.axes:
                continue
            values = _distinct(r.setting(key) for r in self.plottable)
            if len(values) == 1:
                out[key] = values[0]
        return out

    def facets(self, keys: list[str]) -> list[dict[str, Any]]:
        """Every combination of the given axes' values that has at least one run."""
        combos = [dict(zip(keys, values)) for values in itertools.product(*(self.axes[k] for k in keys))]
        return [c for c in combos if any(matches(r, c) for r in self.plottable)]


def matches(run: RunView, settings: dict[str, Any]) -> bool:
    """Whether `run` belongs to a facet: equal on every key its connection does not ignore."""
    return all(run.setting(k) is None or run.setting(k) == v for k, v in settings.items())


def group_runs(runs: Iterable[RunView], keys: list[str]) -> dict[tuple, list[RunView]]:
    """Runs grouped by (connection, values of `keys`), in connection order."""
    groups: dict[tuple, list[RunView]] = {}
    for run in sorted(runs, key=lambda r: SERIES.index(r.connection) if r.connection in SERIES else 99):
        groups.setdefault((run.connection, *(run.setting(k) for k in keys)), []).append(run)
    return groups


def _follows_series(runs: list[RunView], key: str) -> bool:
    """Whether a setting that defines a series (SERIES_KEYS: mHC's Sinkhorn settings, which
    tell `mhc` and `mhc_tol` apart) only tells the series apart: one value per series, more
    than one series, e.g. sinkhorn_iters 20 for mhc and 200 for mhc_tol. Such a key is no axis:
    the series already draws it apart. Any other key (lr, depth, ...) stays an axis even where
    it happens to differ only between connections, so figures never call such runs alike."""
    if key not in SERIES_KEYS:
        return False
    per_series: dict[str, set] = {}
    for run in runs:
        value = run.setting(key)
        if value is not None:
            per_series.setdefault(run.connection, set()).add(repr(value))
    return len(per_series) > 1 and all(len(v) == 1 for v in per_series.values())


def _distinct(values: Iterable[Any]) -> list:
    found = {v for v in values if v is not None}
    return sorted(found, key=lambda v: (not _is_number(v), v if _is_number(v) else str(v)))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_view(path: Path | str) -> ExperimentView:
    """Read an experiment results folder (StoreError if it is not one or is unreadable).

    Every finished run is checked first (store/integrity.py): a damaged one is left out of
    `runs` and listed in `damaged`, so no figure or table shows half a result as a whole one."""
    store = open_results(path)
    try:
        damaged = [c for c in check_store(store) if c.damaged]
        bad = {c.run_id for c in damaged}
        runs = []
        for summary in store.summaries():
            files = store.run(str(summary.get("run_id", "")))
            if files.run_id not in bad:
                runs.append(RunView(files, summary, _run_config(files, summary)))
    except (OSError, ValueError, KeyError, yaml.YAMLError) as exc:  # JSON errors are ValueErrors
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StoreError(f"{store.root}: cannot read the results ({reason})") from None
    resolved = _resolved(store)
    done = {r.run_id for r in runs} | bad
    unfinished = [rid for rid in store.run_ids() if rid not in done]
    return ExperimentView(store, runs, unfinished, resolved, damaged)


def _resolved(store: ExperimentStore) -> dict:
    """resolved.yaml as a mapping ({} if absent); StoreError naming it if it is damaged."""
    if not store.resolved_yaml.exists():
        return {}
    try:
        data = yaml.safe_load(store.resolved_yaml.read_text(encoding="utf-8")) or {}
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise StoreError(f"{store.resolved_yaml}: damaged, not readable as YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise StoreError(f"{store.resolved_yaml}: damaged, not a mapping of experiment keys")
    return data


def _run_config(files: RunFiles, summary: dict) -> dict[str, Any]:
    """The run's resolved config.yaml flattened; the summary's columns if it is missing."""
    if files.config.exists():
        data = yaml.safe_load(files.config.read_text(encoding="utf-8")) or {}
        return flatten(data)
    columns = {"connection": CONNECTION, "depth": DEPTH, "d_model": "model.d_model",
               "n_streams": "model.n_streams", "sinkhorn_iters": "model.sinkhorn_iters",
               "sinkhorn_tol": TOLERANCE,
               "lr": "train.lr", "seed": SEED}
    return {key: summary[col] for col, key in columns.items() if summary.get(col) is not None}
