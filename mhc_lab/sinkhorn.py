"""Sinkhorn-Knopp projection onto (approximately) doubly-stochastic matrices.

Legend: ... = any batch dims (batch, tokens), n = number of residual streams.

mHC paper (arXiv 2512.24880), H_res = SinkhornKnopp(Hres~): M0 = exp(Hres~), then t_max
iterations, each a column normalisation followed by a row normalisation. After the last
iteration the rows sum to 1 exactly (up to rounding) and the columns only approximately.

The iterations run in the log domain (logsumexp), so any finite logits are safe: no overflow
of exp(), no division by an underflowed zero. With `iters = 0` the result is the unconstrained
exp(logits), the ablation the mHC paper compares against; it is not bounded and may overflow
for logits above ~88 in float32, which the training loop reports as divergence.
"""

from __future__ import annotations

import torch


def sinkhorn_log_iterations(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Return log(H) after `iters` column-then-row normalisations of exp(logits).

    logits: (..., n, n). Differentiable by autograd through every iteration.
    """
    log_m = logits
    for _ in range(iters):
        log_m = log_m - torch.logsumexp(log_m, dim=-2, keepdim=True)  # columns sum to 1
        log_m = log_m - torch.logsumexp(log_m, dim=-1, keepdim=True)  # rows sum to 1
    return log_m


def sinkhorn_knopp(logits: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Project logits (..., n, n) onto doubly-stochastic matrices (mHC paper, Sinkhorn-Knopp).

    iters = 0 returns exp(logits) unchanged (the unconstrained ablation).
    """
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    return torch.exp(sinkhorn_log_iterations(logits, iters))
