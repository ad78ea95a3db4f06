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
# The folders committed to the repository (.gitignore lists the same); scratch results that a
# user's `mhc-lab run` leaves under results/ are not checked.
COMMITTED = ("depth", "divergence", "divergence-long", "divergence-native", "divergence-seeds", "expansion", "lr", "scale", "sinkhorn")
RUNS = sorted(p.parent for name in COMMITTED for p in (RESULTS / name).glob("runs/*/hres.npz"))


def composite_gains(hres: np.ndarray) -> tuple[float, float, int]:
    """Largest token-mean Amax gain over l of P_l = H_l...H_0 (rows, forward) and of
    S_l = H_(L-1)...H_l (columns, backward), from H_res of shape (L, T, n, n); and the layer of
    the larger of the two."""
    h = hres.astype(np.float64)
    forward = np.broadcast_to(np.eye(h.shape[-1]), h.shape[1:])
    fwd = []
    for layer in range(h.shape[0]):
        forward = h[layer] @ forward
        fwd.append(float(np.abs(forward.sum(-1)).max(-1).mean()))
    backward = np.broadcast_to(np.eye(h.shape[-1]), h.shape[1:])
    bwd = [0.0] * h.shape[0]
    for layer in reversed(range(h.shape[0])):
        backward = backward @ h[layer]
        bwd[layer] = float(np.abs(backward.sum(-2)).max(-1).mean())
    per_layer = fwd if max(fwd) >= max(bwd) else bwd
    return max(fwd), max(bwd), int(np.argmax(per_layer))


def test_every_committed_folder_has_its_runs():
    for name in COMMITTED:
        assert any(p.parents[1].name == name for p in RUNS), name


@pytest.mark.parametrize("run", RUNS, ids=lambda p: f"{p.parents[1].name}/{p.name}")
def test_peak_gain_follows_from_the_saved_matrices(run: Path):
    summary = json.loads((run / "summary.json").read_text())
    with np.load(run / "hres.npz") as saved:
        fwd, bwd, layer = composite_gains(saved["peak"])
        assert int(saved["peak_step"]) == summary["max_gain_step"]
    probes = [json.loads(line) for line in (run / "probes.jsonl").read_text().splitlines()]
    at_peak = next(p["headline"] for p in probes if p["step"] == summary["max_gain_step"])
    # The saved matrices are the peak probe's: they reproduce both directions recorded there,
    # the run's peak and its layer.
    assert (fwd, bwd) == pytest.approx((at_peak["max_gain_fwd"], at_peak["max_gain_bwd"]), rel=1e-6)
    assert max(fwd, bwd) == pytest.approx(max(summary["max_gain_fwd"], summary["max_gain_bwd"]), rel=1e-6)
    assert layer == summary["max_gain_layer"]
    first = probes[0]
    assert first["step"] == 0
    if summary["connection"] == "hc":
        assert first["headline"]["max_gain"] == 1.0  # identity start: the growth is learned
    if summary["connection"] == "residual":
        assert summary["max_gain_fwd"] == summary["max_gain_bwd"] == fwd == bwd == 1.0


@pytest.mark.parametrize("name", COMMITTED)
def test_committed_results_are_not_checkable_but_not_damaged(name):
    """Written before runs recorded their files (issue #17): `mhc-lab check` says they have no
    record, checks that their files parse, and finds nothing damaged."""
    from .helpers import cli

    result = cli("check", RESULTS / name)
    assert result.exit_code == 0, result.output
    assert "without an integrity record" in result.output and ", 0 damaged" in result.output
