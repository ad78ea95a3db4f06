"""Sinkhorn-Knopp projection onto (approximately) doubly-stochastic matrices.

Legend: ... = any batch dims (batch, tokens), N = their product, n = number of residual
streams, i = row, j = column.

mHC paper (arXiv 2512.24880), H_res = SinkhornKnopp(Hres~): M0 = exp(Hres~), then t_max
iterations, each a column normalisation followed by a row normalisation. After the last
iteration the rows sum to 1 exactly (up to rounding) and the columns only approximately.

Two implementations of the same function:

- `sinkhorn_log_iterations`: the plain reference, every iteration in the log domain
  (logsumexp), differentiated by autograd through every iteration (memory grows with t_max).
- `sinkhorn_knopp` (the public entry point): a custom autograd Function. Its forward keeps no
  graph; its backward recomputes the iterations and differentiates them analytically, so only
  the logits are saved for backward, whatever t_max is (as the paper's kernels do: "recompute
  Sinkhorn in the backward pass instead of storing every iteration"). It is also faster:

  * the n x n matrices are laid out as (n, n, N), tokens last, so every row or column sum is
    a sum of contiguous length-N vectors (reductions over a trailing dim of size 4 are slow);
  * the first iteration runs in the log domain (log-softmax over columns, softmax over rows),
    the others multiplicatively in the exp domain. This is safe for any finite logits: after
    the first iteration every entry is in [0, 1], every row has an entry >= 1/n and every
    column one >= 1/n^2, and each later normalisation keeps both bounds (a column sum is at
    least its largest entry, a row sum at most n), so no sum is ever 0 and nothing overflows.

With `iters = 0` the result is the unconstrained exp(logits), the ablation the mHC paper
compares against; it is not bounded and may overflow for logits above ~88 in float32, which
the training loop reports as divergence. Half-precision logits are computed in float32 and
returned in their own dtype.
"""

from __future__ import annotations

from typing import Optional

import torch


def sinkhorn_log_iterations(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Return log(H) after `iters` column-then-row normalisations of exp(logits).

    logits: (..., n, n). The plain reference: differentiable by autograd through every
    iteration.
    """
    log_m = logits
    for _ in range(iters):
        log_m = log_m - torch.logsumexp(log_m, dim=-2, keepdim=True)  # columns sum to 1
        log_m = log_m - torch.logsumexp(log_m, dim=-1, keepdim=True)  # rows sum to 1
    return log_m


def _tokens_last(logits: torch.Tensor) -> torch.Tensor:
    """(..., n, n) -> contiguous (n, n, N) in at least float32."""
    z = logits.reshape(-1, *logits.shape[-2:])  # (N, n, n)
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    return z.permute(1, 2, 0).contiguous()  # (n_i, n_j, N)


def _tokens_first(h: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(n, n, N) -> (..., n, n) with the shape and dtype of `like`."""
    # contiguous: batched matmuls with H_res take a slow per-matrix path on odd strides
    return h.permute(2, 0, 1).contiguous().reshape(like.shape).to(like.dtype)  # (..., n, n)


def _iterate(z: torch.Tensor, iters: int, trace: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
    """H after `iters` >= 1 iterations, for logits z: (n_i, n_j, N); no autograd.

    With `trace`, appends what the backward pass needs: the column-softmax P of the first
    iteration, then every later half-step's output Y and its normaliser s (Y = X / s).
    """
    log_p = torch.log_softmax(z, dim=0)  # (n, n, N): first column step, columns sum to 1
    h = torch.softmax(log_p, dim=1)  # first row step, still from the log domain
    if trace is not None:
        trace.append(log_p.exp())  # P = softmax_i(z)
        trace.append(h)
    for _ in range(iters - 1):
        for dim in (0, 1):  # column normalisation (sum over i), then row (sum over j)
            s = h.sum(dim, keepdim=True)  # (1, n, N) or (n, 1, N); >= 1/n^2, see docstring
            h = h / s
            if trace is not None:
                trace.append(s)
                trace.append(h)
    return h


def _iterate_backward(grad_h: torch.Tensor, trace: list[torch.Tensor]) -> torch.Tensor:
    """d loss / d z from d loss / d H and the forward trace, all (n_i, n_j, N).

    Y = X / s, s = sum_d X:      dX = (dY - sum_d(dY * Y)) / s
    H1 = softmax_j(L1):         dL1 = H1 * (dH1 - sum_j(dH1 * H1))
    L1 = log_softmax_i(z):      dz = dL1 - P * sum_i(dL1),  P = softmax_i(z)
    """
    g = grad_h
    steps = (len(trace) - 2) // 2
    for k in reversed(range(steps)):
        s, y = trace[2 + 2 * k], trace[3 + 2 * k]
        dim = k % 2  # even half-steps are column steps (dim 0)
        g = (g - (g * y).sum(dim, keepdim=True)) / s
    p, h1 = trace[0], trace[1]
    g = h1 * (g - (g * h1).sum(1, keepdim=True))
    return g - p * g.sum(0, keepdim=True)


class _SinkhornKnopp(torch.autograd.Function):
    """Sinkhorn-Knopp with a recomputing backward: saves only its input."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, iters: int) -> torch.Tensor:  # type: ignore[override]
        ctx.iters = iters
        if iters == 0:
            h = torch.exp(logits)
            ctx.save_for_backward(h)
            return h
        ctx.save_for_backward(logits)
        return _tokens_first(_iterate(_tokens_last(logits), iters), logits)

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor) -> tuple[Optional[torch.Tensor], None]:  # type: ignore[override]
        (saved,) = ctx.saved_tensors
        if ctx.iters == 0:
            return grad_h * saved, None  # d exp(z) = exp(z) dz
        trace: list[torch.Tensor] = []
        _iterate(_tokens_last(saved), ctx.iters, trace)
        g = _iterate_backward(_tokens_last(grad_h).to(trace[0].dtype), trace)
        return _tokens_first(g, saved), None


def sinkhorn_knopp(logits: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Project logits (..., n, n) onto doubly-stochastic matrices (mHC paper, Sinkhorn-Knopp).

    iters = 0 returns exp(logits) unchanged (the unconstrained ablation). Equal, up to float
    rounding, to exp(sinkhorn_log_iterations(logits, iters)), in value and gradient; memory
    saved for backward does not depend on `iters`.
    """
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    return _SinkhornKnopp.apply(logits, iters)
