"""The mHC paper's "Amax gain magnitude" of the residual mixing matrices (DESIGN.md section 3).

Legend: L = layers, T = probe tokens, n = streams. Input: every layer's H_res for every
token, (L, T, n, n); everything is computed in float64. Layers are indexed from 0.

- single-layer gain of H_l: forward = max_i |sum_j H_l[i, j]| (largest |row sum|),
  backward = max_j |sum_i H_l[i, j]| (largest |column sum|);
- forward composite P_l = H_l @ ... @ H_0 (gain on rows), backward composite
  S_l = H_(L-1) @ ... @ H_l (gain on columns);
- two definitions: `amax` (the paper's: absolute value of the sum) and `inf` (the induced
  infinity / one norm: sum of absolute values); they differ for mixed-sign matrices;
- per token first, then aggregated over tokens as `mean` and `max`.

A product that overflows float64 has gain +inf (never NaN).

The composite order follows the mHC paper's Fig. 3 legend (prod_{i=1}^{l} H_{l+1-i} forward,
prod_{i=1}^{61-l} H_{61-i} backward, 1-based), which is also the order in which
x_{l+1} = H_l x_l applies the matrices. Its caption's prod_{i=1}^{L-l} H_{L-i}, read
literally, leaves out the last layer; docs/design.md gives both readings' numbers.
"""

from __future__ import annotations

from typing import Literal

import torch

Direction = Literal["fwd", "bwd"]
Definition = Literal["amax", "inf"]
DEFINITIONS: tuple[Definition, ...] = ("amax", "inf")
DIRECTIONS: tuple[Direction, ...] = ("fwd", "bwd")


def matrix_gain(m: torch.Tensor, direction: Direction, definition: Definition) -> torch.Tensor:
    """Gain of matrices (..., n, n): forward on rows, backward on columns. Returns (...)."""
    sum_dim = -1 if direction == "fwd" else -2  # rows sum over j, columns over i
    if definition == "amax":
        sums = m.sum(sum_dim).abs()
    else:
        sums = m.abs().sum(sum_dim)
    gain = sums.amax(-1)
    return torch.nan_to_num(gain, nan=float("inf"))  # inf - inf after overflow: still inf


def forward_composites(h: torch.Tensor) -> torch.Tensor:
    """P_l = H_l @ H_(l-1) @ ... @ H_0 for every l: (L, T, n, n) -> (L, T, n, n)."""
    out = [h[0]]
    for layer in range(1, h.shape[0]):
        out.append(h[layer] @ out[-1])
    return torch.stack(out)


def backward_composites(h: torch.Tensor) -> torch.Tensor:
    """S_l = H_(L-1) @ ... @ H_l for every l: (L, T, n, n) -> (L, T, n, n)."""
    out = [h[-1]]
    for layer in range(h.shape[0] - 2, -1, -1):
        out.append(out[-1] @ h[layer])
    return torch.stack(out[::-1])


def per_token_gains(hres: torch.Tensor) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """Gains per layer and token: result[kind][direction][definition] is (L, T).

    kind is `single` (each H_l alone) or `composite` (P_l forward, S_l backward).
    """
    h = hres.detach().to(torch.float64)
    if h.ndim != 4 or h.shape[-1] != h.shape[-2]:
        raise ValueError(f"expected H_res of shape (L, T, n, n), got {tuple(hres.shape)}")
    composites = {"fwd": forward_composites(h), "bwd": backward_composites(h)}
    return {
        "single": {d: {k: matrix_gain(h, d, k) for k in DEFINITIONS} for d in DIRECTIONS},
        "composite": {d: {k: matrix_gain(composites[d], d, k) for k in DEFINITIONS} for d in DIRECTIONS},
    }


def gain_metrics(hres: torch.Tensor) -> dict:
    """The full metric as plain lists: result[kind][direction][definition][agg] has one value
    per layer, agg in {`mean`, `max`} over tokens; plus `headline` (see `headline`)."""
    per_token = per_token_gains(hres)
    out: dict = {
        kind: {
            d: {
                k: {"mean": g.mean(dim=1).tolist(), "max": g.amax(dim=1).tolist()}
                for k, g in by_def.items()
            }
            for d, by_def in by_dir.items()
        }
        for kind, by_dir in per_token.items()
    }
    out["headline"] = headline(out)
    return out


def headline(metrics: dict) -> dict:
    """The largest composite gain (token mean), forward and backward, and where it is.

    Returns max_gain_fwd, max_gain_bwd, max_gain (their max), max_gain_layer (0-based) and
    max_gain_direction, plus the infinity-norm variants max_gain_fwd_inf, max_gain_bwd_inf.
    """
    result: dict = {}
    best = (-1.0, 0, "fwd")
    for d in DIRECTIONS:
        per_layer = metrics["composite"][d]["amax"]["mean"]
        layer = max(range(len(per_layer)), key=lambda i: per_layer[i])
        result[f"max_gain_{d}"] = per_layer[layer]
        result[f"max_gain_{d}_inf"] = max(metrics["composite"][d]["inf"]["mean"])
        if per_layer[layer] > best[0]:
            best = (per_layer[layer], layer, d)
    result["max_gain"], result["max_gain_layer"], result["max_gain_direction"] = best
    return result
