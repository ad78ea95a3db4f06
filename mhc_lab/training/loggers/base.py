"""The live-logging interface: a no-op base every backend overrides, and the fan-out that keeps
a failing backend from touching the run.

The trainer calls one `MetricLogger` where it writes its own files (torchtitan's metrics
processor pattern): `start` once the checkpoint is loaded, `log_step` beside each
metrics.jsonl line, `log_probe` beside each probes.jsonl line; the runner calls `finish` with
the summary row (or None when the run was interrupted). The results folder stays the source of
truth: a backend only mirrors what was written there.

What every backend logs, at the run's own step (optimiser updates done):

- per logged step (`step_scalars`): train/loss, train/grad_norm (before clipping), train/lr,
  train/tokens_per_s;
- per probe (`probe_scalars`): probe/val_loss, the headline composite gains probe/gain,
  probe/gain_fwd, probe/gain_bwd (token mean, `amax`; the `inf` variants too) and the layer
  of the largest, probe/signal_growth, and for each statistic under the probe record's `hres`
  its largest and mean value over layers (hres/<name>_max, hres/<name>_mean);
- per probe and layer (`layer_scalars`): the composite gain forward and backward as a
  layer-indexed family, gain_fwd_by_layer/<layer> and gain_bwd_by_layer/<layer>.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

STEP_KEYS = ("loss", "grad_norm", "lr", "tokens_per_s")
HEADLINE_KEYS = {
    "max_gain": "gain", "max_gain_fwd": "gain_fwd", "max_gain_bwd": "gain_bwd",
    "max_gain_fwd_inf": "gain_fwd_inf", "max_gain_bwd_inf": "gain_bwd_inf", "max_gain_layer": "gain_layer",
}


@dataclass(frozen=True)
class RunInfo:
    """What a backend needs to name and describe one run."""

    run_id: str
    experiment: str  # the experiment's name: the W&B group
    root: Path  # the run's folder, <out>/<name>/runs/<run_id>
    config: dict  # the resolved run config (config.yaml)
    connection: str
    # Steps already sent before an interruption, read from metrics.jsonl / probes.jsonl before
    # the resume truncates them (-1: none). A backend that cannot take a step twice skips them.
    logged_step: int = -1
    logged_probe: int = -1
    resuming: bool = False


class MetricLogger:
    """No-op base: every method does nothing. Backends override what they log."""

    label = "no-op"

    def start(self, step: int) -> None:
        """The run (re)starts at `step` (0, or the step of the checkpoint it resumes from)."""

    def log_step(self, record: dict) -> None:
        """One metrics.jsonl record: step, loss, grad_norm, lr, tokens_per_s."""

    def log_probe(self, record: dict) -> None:
        """One probes.jsonl record: step, val_loss, the gain metric, hres statistics, ..."""

    def finish(self, summary: Optional[dict]) -> None:
        """The run ended with this summary row (None: interrupted, to be resumed)."""


@dataclass
class LoggerSet(MetricLogger):
    """Several backends behind one logger. A backend that raises is reported once on stderr and
    dropped for the rest of the run; the run, its files and the other backends go on."""

    backends: list[MetricLogger] = field(default_factory=list)
    run_id: str = ""
    failures: list[str] = field(default_factory=list)

    label = "all"

    def _each(self, method: str, *args: Any) -> None:
        for backend in list(self.backends):
            try:
                getattr(backend, method)(*args)
            except Exception as exc:  # noqa: BLE001 - a logging backend must never fail the run
                self.backends.remove(backend)
                reason = str(exc).strip().splitlines()
                line = (f"warning: {backend.label} logging stopped for run {self.run_id} "
                        f"({type(exc).__name__}: {reason[0] if reason else 'no message'}); the run "
                        "goes on and its results files are complete")
                self.failures.append(line)
                print(line, file=sys.stderr, flush=True)
                if method != "finish":
                    try:
                        backend.finish(None)  # release what it holds (files, a W&B process)
                    except Exception:  # noqa: BLE001
                        pass

    def start(self, step: int) -> None:
        self._each("start", step)

    def log_step(self, record: dict) -> None:
        self._each("log_step", record)

    def log_probe(self, record: dict) -> None:
        self._each("log_probe", record)

    def finish(self, summary: Optional[dict]) -> None:
        self._each("finish", summary)
        self.backends.clear()


def _number(value: Any) -> Optional[float]:
    """A loggable number, or None (strings, None, lists)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def step_scalars(record: dict) -> dict[str, float]:
    """train/<key> for the numbers of one metrics record."""
    out = {}
    for key in STEP_KEYS:
        value = _number(record.get(key))
        if value is not None:
            out[f"train/{key}"] = value
    return out


def probe_scalars(record: dict) -> dict[str, float]:
    """probe/... and hres/... scalars of one probe record (see the module docstring)."""
    out = {}
    value = _number(record.get("val_loss"))
    if value is not None:
        out["probe/val_loss"] = value
    for key, name in HEADLINE_KEYS.items():
        value = _number((record.get("headline") or {}).get(key))
        if value is not None:
            out[f"probe/{name}"] = value
    value = _number(record.get("signal_growth"))
    if value is not None:
        out["probe/signal_growth"] = value
    for key, stat in (record.get("hres") or {}).items():
        if isinstance(stat, list):
            numbers = [v for v in (_number(s) for s in stat) if v is not None]
            if numbers:
                finite = [v for v in numbers if not math.isnan(v)]
                out[f"hres/{key}_max"] = max(finite) if finite else math.nan
                out[f"hres/{key}_mean"] = sum(numbers) / len(numbers)
        elif _number(stat) is not None:
            out[f"hres/{key}"] = float(stat)
    return out


def layer_scalars(record: dict) -> dict[str, float]:
    """gain_<direction>_by_layer/<layer>: the composite gain (token mean, `amax`) of every layer,
    layers zero-padded so that they sort in order."""
    out = {}
    composite = record.get("composite") or {}
    for direction in ("fwd", "bwd"):
        per_layer = ((composite.get(direction) or {}).get("amax") or {}).get("mean") or []
        width = len(str(max(len(per_layer) - 1, 0)))
        for layer, value in enumerate(per_layer):
            number = _number(value)
            if number is not None:
                out[f"gain_{direction}_by_layer/{layer:0{width}d}"] = number
    return out


def summary_values(summary: dict) -> dict[str, Any]:
    """The summary row's plain values (numbers and strings; no nested dicts, no None)."""
    return {k: v for k, v in summary.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
