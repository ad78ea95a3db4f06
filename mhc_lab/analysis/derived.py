"""Numbers derived from a run's saved results beyond its summary row, for the report.

- `bound_breaker_rows`: for every mHC-family run (mhc and its exact variants) whose composite
  backward gain exceeds the paper's 1.6, the layers whose single-layer backward gain is
  largest and the composite gain with those layers replaced by the identity, computed from
  the peak H_res in hres.npz (`probe.constraint.bound_breakers`): the cause of a violation,
  read off the matrices rather than rediscovered by hand.
- `growth_rows`: for every run whose composite gain passed 3000 (the paper's HC value) at a
  probe, when it first did, the share of the probes after warmup at which it stayed above,
  where the peak fell relative to the learning-rate schedule, and the growth rate of
  log10(gain) up to the peak, from step 0 and from the end of warmup (least-squares fits over
  the probes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..probe.constraint import BOUND, BoundBreakers, bound_breakers
from ..store import as_float
from .view import ExperimentView, RunView

CONSTRAINED = ("mhc", "mhc_tol", "mhc_lite", "kromhc", "ortho")  # H_res meant to be doubly stochastic
PAPER_HC_GAIN = 3000.0


@dataclass(frozen=True)
class BreakerRow:
    """One run over the bound: its peak, and what the saved matrices say caused it."""

    run: RunView
    peak_bwd: float
    breakers: BoundBreakers


def bound_breaker_rows(view: ExperimentView, bound: float = BOUND) -> list[BreakerRow]:
    """Every mHC-family run whose peak composite backward gain exceeds `bound`, with the
    layers that break it (from hres.npz; runs without saved matrices are left out)."""
    rows = []
    for run in view.plottable:
        peak = run.number("max_gain_bwd")
        if run.connection not in CONSTRAINED or not peak > bound:
            continue
        saved = run.load_hres()
        if saved is None:
            continue
        rows.append(BreakerRow(run, peak, bound_breakers(saved["peak"], bound)))
    return rows


@dataclass(frozen=True)
class GrowthRow:
    """How one run's composite gain evolved over its probes."""

    run: RunView
    first_above: Optional[int]  # first probe step with gain > 3000; None if never
    share_above: float  # share of probes after warmup with gain > 3000
    peak_step: int
    peak_gain: float
    warmup: int
    steps: int
    slope: float  # fitted d log10(gain) / d step, step 0 to the peak
    slope_after_warmup: float  # the same fit from the end of warmup to the peak (nan: < 2 probes)


def growth_row(run: RunView) -> Optional[GrowthRow]:
    """The growth of a run's headline gain (max of forward and backward, token mean) over its
    probes; None for a run without probes."""
    steps, gains = run.probe_series(lambda p: p["headline"]["max_gain"])
    if len(steps) == 0:
        return None
    warmup = int(run.config.get("train.warmup") or 0)
    total = int(run.config.get("train.steps") or steps[-1])
    finite = np.where(np.isfinite(gains), gains, np.inf)
    above = finite > PAPER_HC_GAIN
    first = int(steps[np.argmax(above)]) if above.any() else None
    late = steps >= warmup
    share = float(above[late].mean()) if late.any() else float("nan")
    k = int(np.argmax(finite))
    return GrowthRow(run, first, share, int(steps[k]), float(gains[k]), warmup, total,
                     _log_slope(steps[: k + 1], finite[: k + 1]),
                     _log_slope(steps[: k + 1][late[: k + 1]], finite[: k + 1][late[: k + 1]]))


def _log_slope(steps: np.ndarray, gains: np.ndarray) -> float:
    """Least-squares slope of log10(gain) against step over the finite, positive points."""
    ok = np.isfinite(gains) & (gains > 0)
    return float(np.polyfit(steps[ok], np.log10(gains[ok]), 1)[0]) if ok.sum() >= 2 else float("nan")


def growth_rows(view: ExperimentView) -> list[GrowthRow]:
    """`growth_row` for every run whose gain passed 3000 at some probe."""
    rows = [growth_row(run) for run in view.plottable]
    return [r for r in rows if r is not None and r.first_above is not None]


def schedule_phase(step: int, warmup: int, steps: int) -> str:
    """Where a step falls in the schedule: 'warmup (k/w)', 'at the end of warmup', or the
    fraction of the decay phase after warmup."""
    if step < warmup:
        return f"in warmup ({step}/{warmup})"
    if step == warmup or (warmup and abs(step - warmup) <= max(1, warmup // 10)):
        return "at the end of warmup (peak lr)"
    span = max(steps - warmup, 1)
    return f"{100 * (step - warmup) / span:.0f}% into the decay after warmup"


def last_gain(run: RunView, direction: str) -> float:
    """The composite gain at the run's last probe: the summary's final_gain_<direction>, or,
    for results written before it was recorded, the last probe's headline."""
    value = run.number(f"final_gain_{direction}")
    if math.isnan(value) and run.probes:
        value = as_float(run.probes[-1]["headline"].get(f"max_gain_{direction}"))
    return value
