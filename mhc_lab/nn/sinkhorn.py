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
from torch.autograd.function import once_differentiable
from torch.compiler import is_compiling

from . import native


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


def _tokens_first(h: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """(n, n, N) -> (..., n, n) of the given shape and dtype."""
    # contiguous: batched matmuls with H_res take a slow per-matrix path on odd strides
    return h.permute(2, 0, 1).contiguous().reshape(shape).to(dtype)  # (..., n, n)


def _iterate(z: torch.Tensor, iters: int, trace: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
    """H after `iters` >= 1 iterations, for logits z: (n_i, n_j, N); no autograd.

    With `trace`, appends what the backward pass needs: the output of every normalisation,
    in order (the first column step's P = softmax_i(z), then the first row step's H1, then
    every later half-step's). Without it, the later half-steps run in place.
    """
    log_p = torch.log_softmax(z, dim=0)  # (n, n, N): first column step, columns sum to 1
    h = torch.softmax(log_p, dim=1)  # first row step, still from the log domain
    if trace is not None:
        trace.append(log_p.exp())  # P = softmax_i(z)
        trace.append(h)
    for _ in range(iters - 1):
        for dim in (0, 1):  # column normalisation (sum over i), then row (sum over j)
            s = h.sum(dim, keepdim=True)  # (1, n, N) or (n, 1, N); >= 1/n^2, see docstring
            if trace is None:
                h.div_(s)
            else:
                h = h / s
                trace.append(h)
    return h


def _iterate_backward(grad_h: torch.Tensor, trace: list[torch.Tensor]) -> torch.Tensor:
    """d loss / d z from d loss / d H and the forward trace, all (n_i, n_j, N).

    Every step, the two log-domain ones included, is a normalisation Y = X / sum_d X along
    d = i (column) or j (row): P = exp(z) / sum_i exp(z), H1 = P / sum_j P, then the later
    half-steps. Written for W = dY * Y (elementwise), its backward is one line,

        dX * X = dY * Y - Y * sum_d(dY * Y),  i.e.  W <- W - Y * sum_d(W),

    and the first step's X is exp(z), whose dX * X is dz: so dz is W after every step.
    """
    w = grad_h * trace[-1]  # dH * H
    for k in reversed(range(len(trace))):
        dim = k % 2  # trace[0] is a column step (sum over i), then they alternate
        w.addcmul_(trace[k], w.sum(dim, keepdim=True), value=-1.0)
    return w


def _use_native(logits: torch.Tensor) -> bool:
    """True if the fused CPU kernel (mhc_lab/native) takes these logits (float32/64 on CPU,
    eager mode): the same steps, for blocks of tokens at a time, without a pass over memory
    per step."""
    if is_compiling() or type(logits) is not torch.Tensor or logits.shape[-1] != logits.shape[-2]:
        return False
    return native.usable(logits)


class _SinkhornKnopp(torch.autograd.Function):
    """Sinkhorn-Knopp with a recomputing backward: saves only its input."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, iters: int) -> torch.Tensor:  # type: ignore[override]
        ctx.iters = iters
        if iters == 0:
            h = torch.exp(logits)
            ctx.save_for_backward(h)
            return h
        ctx.shape, ctx.dtype = logits.shape, logits.dtype
        flat = logits.reshape(-1, *logits.shape[-2:]).contiguous()  # (N, n, n)
        ctx.native = _use_native(flat)
        if ctx.native:
            ctx.save_for_backward(flat)
            return native.sinkhorn_forward(flat, iters).view(logits.shape)
        z = _tokens_last(logits)  # (n, n, N)
        ctx.save_for_backward(z)  # the logits, already in the iterations' layout
        return _tokens_first(_iterate(z, iters), logits.shape, logits.dtype)

    @staticmethod
    @once_differentiable  # the analytic backward (in-place steps, native kernel) is first order only
    def backward(ctx, grad_h: torch.Tensor) -> tuple[Optional[torch.Tensor], None]:  # type: ignore[override]
        (saved,) = ctx.saved_tensors
        if ctx.iters == 0:
            return grad_h * saved, None  # d exp(z) = exp(z) dz
        if ctx.native:
            grad_flat = grad_h.reshape(saved.shape).to(saved.dtype).contiguous()
            return native.sinkhorn_backward(saved, grad_flat, ctx.iters).view(grad_h.shape), None
        trace: list[torch.Tensor] = []
        _iterate(saved, ctx.iters, trace)
        g = _iterate_backward(_tokens_last(grad_h).to(saved.dtype), trace)
        return _tokens_first(g, ctx.shape, ctx.dtype), None


def sinkhorn_knopp(logits: torch.Tensor, iters: int = 20, tol: Optional[float] = None) -> torch.Tensor:
    """Project logits (..., n, n) onto doubly-stochastic matrices (mHC paper, Sinkhorn-Knopp).

    iters = 0 returns exp(logits) unchanged (the unconstrained ablation). Equal, up to float
    rounding, to exp(sinkhorn_log_iterations(logits, iters)), in value and gradient; memory
    saved for backward does not depend on `iters`.

    With `tol` (Sinkhorn to convergence, a departure from the paper's fixed t_max): as many
    iterations as the worst token of this call needs for every column sum to be within `tol`
    of 1, at most `iters` (`iterations_for_tolerance`); every token of the call gets that same
    count, which the backward recomputes. Memory still does not depend on the count.
    """
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    if tol is not None and iters > 0:
        iters = iterations_for_tolerance(logits, tol, iters)
    return _SinkhornKnopp.apply(logits, iters)


def iterations_needed(logits: torch.Tensor, tol: float, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, the iterations Sinkhorn-Knopp needs until every column sum of H is within
    `tol` of 1 (rows are exactly 1 after each iteration), at most `cap`; and whether it got
    there. logits (..., n, n) -> two (...) tensors: int64 counts (`cap` where it did not
    converge) and bool. No autograd; the same steps as the forward (`_iterate`)."""
    if cap < 1:
        raise ValueError(f"cap must be >= 1, got {cap}")
    z = _tokens_last(logits.detach())  # (n, n, N)
    needed = torch.full(z.shape[-1:], cap, dtype=torch.int64, device=z.device)
    h = torch.softmax(torch.log_softmax(z, dim=0), dim=1)  # iteration 1
    done = _column_error(h) <= tol  # (N,)
    needed[done] = 1
    for k in range(2, cap + 1):
        if bool(done.all()):
            break
        h.div_(h.sum(0, keepdim=True)).div_(h.sum(1, keepdim=True))  # column step, row step
        newly = ~done & (_column_error(h) <= tol)
        needed[newly] = k
        done |= newly
    shape = logits.shape[:-2]
    return needed.reshape(shape), done.reshape(shape)


def iterations_for_tolerance(logits: torch.Tensor, tol: float, cap: int) -> int:
    """The iterations every column sum of every token needs to be within `tol`, at most `cap`."""
    needed, _ = iterations_needed(logits, tol, cap)
    return int(needed.max()) if needed.numel() else 1


def _column_error(h: torch.Tensor) -> torch.Tensor:
    """max_j |sum_i H_ij - 1| per token for H laid out (n_i, n_j, N): (N,)."""
    return (h.sum(0) - 1).abs().amax(0)
