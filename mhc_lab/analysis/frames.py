"""A results folder as tidy pandas DataFrames, for notebooks (`mhc_lab.results.load`).

    r = load("results/divergence")
    r.runs       one row per finished run: the summary row (summary.json), the swept settings
                 that the summary does not name (dotted keys, e.g. `model.mhc_init_logit`), the
                 headline `peak_gain` and the training stability after warmup (analysis/view.py)
    r.metrics    one row per run and logged step: loss, grad_norm (before clipping), lr,
                 tokens_per_s
    r.probes     one row per run, probe and layer: every gain column of the probe
                 (`<kind>_<direction>_<definition>_<agg>`, e.g. `composite_fwd_amax_mean`, the
                 paper's gain; probe/gain.py), the `hres_*` statistics of that layer, the RMS of
                 the hidden state entering it (`stream_rms`), and the probe's own numbers
                 (val_loss, signal_growth, `headline_*`) repeated on each of its layers
    r.hres(run_id)   H_res arrays of one run (hres.npz: `peak`, `final` [layers, tokens, n, n],
                 `peak_step`, `final_step`); `r.hres()` every run's, by run id

Every frame starts with `experiment` (the folder's name) and `run_id`, so frames of several
folders concatenate (`pandas.concat`); metrics and probes also carry `connection` and `seed`.
Numbers stored as "inf" / "nan" strings come back as floats. Frames are read once and cached.
pandas is an optional extra (`pip install -e ".[pandas]"`); without it `load` says so in one line.
"""

from __future__ import annotations

import math
from functools import cached_property
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import MhcLabError
from ..store import SUMMARY_COLUMNS
from .view import ExperimentView, RunView, load_view

TEXT_COLUMNS = {"run_id", "connection", "status", "reason"}
# swept settings that the summary row already names
IN_SUMMARY = {"model.depth", "model.d_model", "model.n_streams", "model.sinkhorn_iters", "train.lr"}
STABILITY_COLUMNS = ("max_grad_norm", "max_grad_norm_step", "median_grad_norm", "grad_spikes",
                     "max_loss_rise", "max_loss_rise_step", "dead_from")


class PandasMissing(MhcLabError, ImportError):
    """pandas is not installed (an optional extra)."""


def _pandas():
    try:
        import pandas
    except ImportError:
        raise PandasMissing(
            'mhc_lab.results needs pandas: pip install -e ".[pandas]" (or pip install pandas)'
        ) from None
    return pandas


def _value(value: Any) -> Any:
    """A stored number as a float ("inf"/"nan" strings too); other values as they are."""
    if isinstance(value, str) and value in ("inf", "-inf", "nan"):
        return float(value)
    return value


class Results:
    """The DataFrames of one results folder (module docstring); build with `load`."""

    def __init__(self, view: ExperimentView) -> None:
        self.view = view
        self.pd = _pandas()

    @property
    def name(self) -> str:
        return self.view.store.name

    def __repr__(self) -> str:
        return f"Results({str(self.view.store.root)!r}: {len(self.view.runs)} runs)"

    def _ids(self, run: RunView) -> dict[str, Any]:
        return {"experiment": self.name, "run_id": run.run_id}

    @property
    def settings(self) -> list[str]:
        """The swept settings (dotted keys) that the summary row does not name."""
        return [k for k in self.view.axes if k not in IN_SUMMARY]

    @cached_property
    def runs(self):
        """One row per finished run (failed runs included, with their reason)."""
        rows = [self._run_row(run) for run in self.view.runs]
        extra = sorted({k for row in rows for k in row} - {"experiment", *SUMMARY_COLUMNS, "peak_gain",
                                                           *STABILITY_COLUMNS, *self.settings})
        columns = ["experiment", *SUMMARY_COLUMNS, *extra, *self.settings, "peak_gain", *STABILITY_COLUMNS]
        frame = self.pd.DataFrame(rows, columns=columns)
        return self._numeric(frame, skip=TEXT_COLUMNS | {"experiment"})

    def _run_row(self, run: RunView) -> dict[str, Any]:
        summary = {k: _value(v) for k, v in run.summary.items() if not isinstance(v, (dict, list))}
        row = {**self._ids(run), **summary, "peak_gain": run.peak_gain}
        for key in self.settings:
            row[key] = run.setting(key)
        stab = run.stability if run.metrics else None
        if stab is not None:
            steps, norms = run.metric("grad_norm")
            warm = norms[steps >= int(run.config.get("train.warmup") or 0)]
            row.update(max_grad_norm=stab.max_grad_norm, max_grad_norm_step=stab.grad_step,
                       median_grad_norm=float(np.median(warm)) if len(warm) else math.nan,
                       grad_spikes=stab.grad_spikes, max_loss_rise=stab.loss_rise,
                       max_loss_rise_step=stab.rise_step, dead_from=stab.dead_from)
        return row

    @cached_property
    def metrics(self):
        """One row per run and logged step."""
        rows = [{**self._ids(run), "connection": run.connection, "seed": run.seed,
                 **{k: _value(v) for k, v in record.items()}}
                for run in self.view.runs for record in run.metrics]
        columns = ["experiment", "run_id", "connection", "seed", "step", "loss", "grad_norm", "lr", "tokens_per_s"]
        frame = self.pd.DataFrame(rows, columns=columns + sorted({k for r in rows for k in r} - set(columns)))
        return self._numeric(frame, skip={"experiment", "run_id", "connection"})

    @cached_property
    def probes(self):
        """One row per run, probe and layer."""
        rows = []
        for run in self.view.runs:
            for record in run.probes:
                rows += probe_rows(record, self._ids(run) | {"connection": run.connection, "seed": run.seed})
        first = ["experiment", "run_id", "connection", "seed", "step", "layer"]
        frame = self.pd.DataFrame(rows, columns=first + list(dict.fromkeys(k for r in rows for k in r if k not in first)))
        return self._numeric(frame, skip={"experiment", "run_id", "connection", "headline_max_gain_direction"})

    def hres(self, run_id: Optional[str] = None):
        """H_res of one run (dict of arrays: peak, final, peak_step, final_step; None if the run
        saved none), or with no run id a dict run_id -> that, for every run that has one."""
        runs = {r.run_id: r for r in self.view.runs}
        if run_id is None:
            return {rid: arrays for rid, run in runs.items() if (arrays := run.load_hres()) is not None}
        if run_id not in runs:
            raise KeyError(f"{run_id!r} is not a finished run of {self.view.store.root}")
        return runs[run_id].load_hres()

    def _numeric(self, frame, skip: set[str]):
        for column in frame.columns:
            if column not in skip:
                converted = self.pd.to_numeric(frame[column], errors="coerce")
                if converted.notna().sum() == frame[column].notna().sum():  # numbers (and gaps) only
                    frame[column] = converted
        return frame


def probe_rows(record: dict, ids: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per layer of a probe record: per-layer lists (length L) become a column each,
    nested keys joined by `_`; the probe's scalars are repeated on every layer."""
    layers = len(record["composite"]["fwd"]["amax"]["mean"])
    shared: dict[str, Any] = {**ids, "step": record["step"]}
    per_layer: dict[str, list] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}_{key}" if prefix else key, inner)
        elif isinstance(value, list):
            if len(value) == layers:
                per_layer[prefix] = value
            elif prefix == "stream_rms" and len(value) == layers + 1:  # entering each layer, then leaving the last
                per_layer[prefix] = value[:layers]
                shared["stream_rms_out"] = _value(value[-1])
        elif prefix != "step":
            shared[prefix] = _value(value)

    walk("", {k: v for k, v in record.items() if k != "step"})
    probe = {k: v for k, v in shared.items() if k not in ids and k != "step"}
    return [{**ids, "step": record["step"], "layer": layer,
             **{k: _value(v[layer]) for k, v in per_layer.items()}, **probe}
            for layer in range(layers)]


def load(path: Path | str) -> Results:
    """The DataFrames of a results folder written by `mhc-lab run` (module docstring).

    StoreError if `path` is not one; PandasMissing (an ImportError) without pandas."""
    _pandas()
    return Results(load_view(path))
