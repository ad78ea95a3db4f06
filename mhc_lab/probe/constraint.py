"""How well each layer's H_res keeps its doubly-stochastic constraint, and which layers break
the composite bound (docs/design.md, "Diagnostics of the constraint").

Legend: L = layers, T = probe tokens, n = streams, K = H_res logits per token.

Per probe and layer (`hres_statistics`, `constraint_statistics`):
- `identity_dist`: mean Frobenius distance of H_res from I (did H_res move at all?);
- `row_sum_err`, `col_sum_err`: worst |row / column sum - 1| over tokens (Sinkhorn ends each
  iteration with the rows, so its column error is the measured quantity);
- `logit_spread_mean`, `logit_spread_max`, `logit_spread_share30`: the spread max - min of a
  token's H_res logits (for Sinkhorn, the "log 1/nu" of the mHC-lite paper's analysis, whose
  convergence bound worsens as e^spread), mean and max over tokens, and the share of tokens
  above `SLOW_SPREAD` = 30, where finite Sinkhorn converges slowly;
- with `model.sinkhorn_tol`: `sinkhorn_iters_mean`, `sinkhorn_iters_max` (the iterations each
  token needs to bring every column within tol, at most t_max; the probe's forward used the
  max for every token) and `sinkhorn_unconverged` (the share of tokens still outside tol).

`bound_breakers` reads a run's saved H_res (hres.npz) and names the layers whose single-layer
backward gain is largest (every layer with a column summing past 1.5, then more while the
composite is above the bound), with the composite backward gain once those layers are
replaced by the identity: the cause of a violated bound, read off the matrices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .gain import backward_composites, matrix_gain

SLOW_SPREAD = 30.0  # logit spread above which 20 Sinkhorn iterations converge slowly
BOUND = 1.6  # the mHC paper's largest composite gain (27B model)
FAILED_LAYER = 1.5  # a single layer with a column summing past this has clearly failed its constraint


def hres_statistics(hres: torch.Tensor) -> dict[str, list[float]]:
    """Per layer: mean Frobenius distance of H_res (L, T, n, n) from I, and worst |row/column
    sum - 1| over tokens. A flat mHC gain of 1 can hide an H_res that never left the identity;
    `identity_dist` shows whether it moved, the sum errors how far the matrices are from
    doubly stochastic."""
    h = hres.detach().to(torch.float64)  # (L, T, n, n)
    eye = torch.eye(h.shape[-1], dtype=h.dtype)
    return {
        "identity_dist": torch.linalg.matrix_norm(h - eye).mean(dim=1).tolist(),
        "row_sum_err": (h.sum(-1) - 1).abs().amax(dim=(1, 2)).tolist(),
        "col_sum_err": (h.sum(-2) - 1).abs().amax(dim=(1, 2)).tolist(),
    }


def constraint_statistics(diagnostics: list[Optional[dict[str, torch.Tensor]]]) -> dict[str, list]:
    """Per-layer summaries of the per-token diagnostics a connection gives at a probe
    (`ManifoldHyperConnection.diagnose`: `logit_spread`, and with a Sinkhorn tolerance
    `sinkhorn_iters` and `sinkhorn_converged`, each (T,)). Layers without diagnostics (the
    residual, HC) give no keys; a list has one entry per layer."""
    present = [d for d in diagnostics if d is not None]
    if not present:
        return {}
    out: dict[str, list] = {}

    def add(key: str, pick) -> None:
        out[key] = [None if d is None else pick(d) for d in diagnostics]

    if all("logit_spread" in d for d in present):
        add("logit_spread_mean", lambda d: float(d["logit_spread"].double().mean()))
        add("logit_spread_max", lambda d: float(d["logit_spread"].double().max()))
        add("logit_spread_share30", lambda d: float((d["logit_spread"] > SLOW_SPREAD).double().mean()))
    if all("sinkhorn_iters" in d for d in present):
        add("sinkhorn_iters_mean", lambda d: float(d["sinkhorn_iters"].double().mean()))
        add("sinkhorn_iters_max", lambda d: int(d["sinkhorn_iters"].max()))
        add("sinkhorn_unconverged", lambda d: float((~d["sinkhorn_converged"]).double().mean()))
    return out


@dataclass(frozen=True)
class BoundBreakers:
    """The layers that break a composite backward bound, and what is left without them.

    `layers`: layer indices in the order chosen (largest single-layer backward gain first,
    max over tokens), with `single_gains` their gains; `before` and `after`: the largest
    composite backward gain (token mean, over layers) of the saved H_res as it is and with
    those layers replaced by the identity."""

    layers: list[int]
    single_gains: list[float]
    before: float
    after: float


def composite_backward_peak(h: torch.Tensor) -> float:
    """The largest token-mean backward composite gain over layers of H_res (L, T, n, n)."""
    return float(matrix_gain(backward_composites(h), "bwd", "amax").mean(dim=1).max())


def bound_breakers(hres, bound: float = BOUND, most: int = 5, failed: float = FAILED_LAYER) -> BoundBreakers:
    """The layers that break a composite backward bound: every layer whose single-layer
    backward gain (max over tokens) exceeds `failed` (a column summing to 1.5 or more: the
    constraint clearly failed there), largest first, then, while the composite is still above
    `bound`, the next largest; at most `most` layers, each replaced by the identity.
    hres: (L, T, n, n) array or tensor (computed in float64)."""
    h = torch.as_tensor(hres).to(torch.float64).clone()
    single = matrix_gain(h, "bwd", "amax").amax(dim=1)  # (L,): max over tokens
    order = torch.argsort(single, descending=True).tolist()
    before = after = composite_backward_peak(h)
    chosen: list[int] = []
    eye = torch.eye(h.shape[-1], dtype=h.dtype)
    for layer in order[:most]:
        if single[layer] <= failed and after <= bound:
            break
        h[layer] = eye
        chosen.append(layer)
        after = composite_backward_peak(h)
    return BoundBreakers(chosen, [float(single[k]) for k in chosen], before, after)
