"""The committed results check out: every run's peak gain follows from its saved matrices.

Issue #5 asks that the headline be "checkable from the saved matrices". For every run under
results/, the composite gain is recomputed here by hand (numpy, float64) from the H_res that
hres.npz saved at the run's peak probe, and must equal the peak gain in its summary.json;
HC must start from exactly 1 and the plain residual must stay exactly 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

RESULTS = Path(__file__).resolve().parents[1] / "results"
RUNS = sorted(p.parent for p in RESULTS.glob("*/runs/*/hres.npz"))


def composite_gain(hres: np.ndarray) -> float:
    """Largest token-mean Amax gain of P_l = H_l...H_0 (rows) and S_l = H_(L-1)...H_l
    (columns) over l, from H_res of shape (L, T, n, n)."""
    h = hres.astype(np.float64)
    best = 0.0
    forward = np.broadcast_to(np.eye(h.shape[-1]), h.shape[1:])
    for layer in range(h.shape[0]):
        forward = h[layer] @ forward
        best = max(best, float(np.abs(forward.sum(-1)).max(-1).mean()))
    backward = np.broadcast_to(np.eye(h.shape[-1]), h.shape[1:])
    for layer in reversed(range(h.shape[0])):
        backward = backward @ h[layer]
        best = max(best, float(np.abs(backward.sum(-2)).max(-1).mean()))
    return best


def test_the_shipped_results_are_here():
    assert {p.parents[1].name for p in RUNS} >= {"divergence", "depth"}


@pytest.mark.parametrize("run", RUNS, ids=lambda p: f"{p.parents[1].name}/{p.name}")
def test_peak_gain_follows_from_the_saved_matrices(run: Path):
    summary = json.loads((run / "summary.json").read_text())
    with np.load(run / "hres.npz") as saved:
        recomputed = composite_gain(saved["peak"])
        assert int(saved["peak_step"]) == summary["max_gain_step"]
    assert recomputed == pytest.approx(max(summary["max_gain_fwd"], summary["max_gain_bwd"]), rel=1e-6)
    first = json.loads((run / "probes.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0
    if summary["connection"] == "hc":
        assert first["headline"]["max_gain"] == 1.0  # identity start: the growth is learned
    if summary["connection"] == "residual":
        assert summary["max_gain_fwd"] == summary["max_gain_bwd"] == recomputed == 1.0
