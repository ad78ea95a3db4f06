"""Per-token stream mixing as small custom autograd Functions (DESIGN.md section 2).

Legend: M = tokens (batch * seq), n = residual streams, C = d_model, K = coefficients.

- `_StreamRead`: y = R x per token with R = [H_pre; H_res] ((1 + n) x n): the sublayer input
  H_pre x and H_res x from one read of the streams.
- `_StreamWrite`: H_res x + H_post^T F, with a backward that writes no (M, n, C) temporaries.
- `_RmsProjection`: RMSNorm(v) @ W as (v @ W) / rms(v), the norm weight folded into W.

The read and the write run the CPU kernels of `mhc_lab.native` when they apply (eager,
contiguous float32/float64 CPU tensors) and torch ops otherwise (CUDA, bf16, torch.compile);
the projection is torch ops (on CPU the fused paths of `fused.py` replace it and the read).
Speed notes and figures: BENCHMARKS.md. tests/test_connections_fast.py checks both paths against a
plain transcription of the equations, values and gradients.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from torch.compiler import is_compiling

from . import native

Sublayer = Callable[[torch.Tensor], torch.Tensor]


def _per_token_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b per token: a (M, P, Q), b (M, Q, R) -> (M, P, R), with P, Q or R small.

    Eager: torch.bmm. Under torch.compile: a broadcast multiply-sum, which Inductor fuses into
    one loop over the operands; it keeps a bmm as a library call, and batched matmuls of tiny
    per-token matrices run at a fraction of memory bandwidth (BENCHMARKS.md).
    """
    if is_compiling():
        return (a.unsqueeze(-1) * b.unsqueeze(-3)).sum(-2)  # (M, P, Q, 1) * (M, 1, Q, R)
    return torch.bmm(a, b)


def use_native(*tensors: torch.Tensor, streams: int = 1) -> bool:
    """True if the fused CPU kernels (mhc_lab/native) can compute with these tensors: plain
    contiguous float32/float64 CPU tensors in eager mode (never while torch.compile traces),
    and `streams` within what the mixing kernels take."""
    if is_compiling() or any(type(t) not in (torch.Tensor, nn.Parameter) for t in tensors):
        return False
    return native.usable(*tensors, streams=streams)


class _StreamRead(torch.autograd.Function):
    """y = R @ x per token, returned as (y[0], y[1:]): the sublayer input and H_res @ x.

    x: (M, n, C), R: (M, 1 + n, n) = [H_pre; H_res]. One pass over x for both reads; the
    backward joins the two output gradients once instead of autograd's zero-fill per slice.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, read: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        ctx.save_for_backward(x, read)
        if use_native(x, read, streams=x.shape[1]):
            return native.read_forward(x, read)  # one pass over x, into the two outputs
        y = _per_token_matmul(read, x)  # (M, 1 + n, C)
        # The sublayer saves its input for backward: a view would keep all of y alive.
        return y[:, 0].contiguous(), y[:, 1:]  # (M, C), (M, n, C)

    @staticmethod
    def backward(ctx, grad_in: Optional[torch.Tensor], grad_mixed: Optional[torch.Tensor]):  # type: ignore[override]
        x, read = ctx.saved_tensors
        m, n, c = x.shape
        if grad_in is None:
            grad_in = x.new_zeros(m, c)
        if grad_mixed is None:
            grad_mixed = x.new_zeros(m, n, c)
        grad_in, grad_mixed = grad_in.contiguous(), grad_mixed.contiguous()
        # create_graph (double backward) needs a differentiable backward: the torch ops
        if not torch.is_grad_enabled() and use_native(x, read, grad_in, grad_mixed, streams=n):
            return native.read_backward(x, read, grad_in, grad_mixed, *ctx.needs_input_grad)
        grad_y = torch.cat([grad_in.unsqueeze(1), grad_mixed], dim=1)  # (M, 1 + n, C)
        # Under autocast the two gradients and the saved inputs can differ in dtype.
        x, read = x.to(grad_y.dtype), read.to(grad_y.dtype)
        grad_x = _per_token_matmul(read.transpose(1, 2), grad_y) if ctx.needs_input_grad[0] else None
        grad_read = _per_token_matmul(grad_y, x.transpose(1, 2)) if ctx.needs_input_grad[1] else None
        return grad_x, grad_read  # (M, n, C), (M, 1 + n, n)


class _StreamWrite(torch.autograd.Function):
    """out = mixed + H_post^T F per token: mixed (..., n, C), h_post (..., n), F (..., C).

    The backward contracts over C and over n without writing (M, n, C) temporaries
    (autograd's addcmul backward writes two). With `in_place`, the sum is written into
    `mixed` (for a buffer nothing else reads, as the fused paths' H_res x): no new
    (M, n, C) allocation. The incoming gradient is never written: it is returned as the
    gradient of `mixed` (d out / d mixed = I) and only read for the other two, so a hook or
    `retain_grad` on `out` keeps seeing what autograd computed.
    """

    @staticmethod
    def forward(ctx, mixed: torch.Tensor, h_post: torch.Tensor, layer_out: torch.Tensor, in_place: bool = False) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(h_post, layer_out)
        if in_place:
            ctx.mark_dirty(mixed)
            return mixed.addcmul_(h_post.unsqueeze(-1), layer_out.unsqueeze(-2))  # (M, n, C)
        return torch.addcmul(mixed, h_post.unsqueeze(-1), layer_out.unsqueeze(-2))  # (M, n, C)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        h_post, layer_out = ctx.saved_tensors
        grad = grad.contiguous()  # the last layer's gradient is expanded (streams are summed)
        h_post, layer_out = h_post.to(grad.dtype), layer_out.to(grad.dtype)  # autocast: mixed
        if not torch.is_grad_enabled() and use_native(grad, layer_out, h_post, streams=grad.shape[-2]):
            return grad, *native.write_backward(grad, layer_out, h_post, *ctx.needs_input_grad[1:3]), None
        grad_post = grad_out = None
        if ctx.needs_input_grad[1]:
            grad_post = torch.linalg.vecdot(grad, layer_out.unsqueeze(-2))  # (M, n): sum over C
        if ctx.needs_input_grad[2]:
            grad_out = _weighted_stream_sum(grad, h_post)  # (M, C): sum over n
        return grad, grad_post, grad_out, None


def _weighted_stream_sum(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum_i weight[..., i] * x[..., i, :] for x: (..., n, C), weight: (..., n); returns (..., C).

    One multiply-add per stream: batched (1 x n) @ (n x C) matmuls ran up to 8x slower at
    C = 64 on CPU (about equal at C = 256), see BENCHMARKS.md.
    """
    out = x[..., 0, :] * weight[..., :1]  # (..., C)
    for i in range(1, x.shape[-2]):
        out.addcmul_(x[..., i, :], weight[..., i : i + 1])
    return out


def mix_read(
    x: torch.Tensor, read: torch.Tensor, h_post: torch.Tensor, sublayer: Sublayer
) -> torch.Tensor:
    """The general update with the two reads stacked: R = [H_pre; H_res], shape (B, T, 1 + n, n).

    x: (B, T, n, C), h_post: (B, T, n). Returns H_res x + H_post^T F(H_pre x): (B, T, n, C).
    """
    b, t, n, c = x.shape
    # (B*T, n, C); contiguous: the model's first x is an expanded view, and batched matmul on
    # a zero stride falls back to one small matmul per token.
    x_flat = x.reshape(b * t, n, c).contiguous()
    # The coefficients are small: make them row-major too (same fallback otherwise).
    read = read.reshape(b * t, n + 1, n).contiguous()  # (B*T, 1 + n, n)
    h_post = h_post.reshape(b * t, n).contiguous()  # (B*T, n)
    layer_in, mixed = _StreamRead.apply(x_flat, read)
    layer_out = sublayer(layer_in.view(b, t, c))  # (B, T, C): F(H_pre x)
    # The native read writes H_res x into its own buffer, which nothing else reads: the write
    # goes into it (no new (M, n, C) tensor); the torch ops' is a view of the stacked product.
    in_place = mixed._base is None and not is_compiling()
    out = _StreamWrite.apply(mixed, h_post, layer_out.reshape(b * t, c), in_place)
    return out.view(b, t, n, c)  # (B, T, n, C)


def mix_streams(
    x: torch.Tensor,
    h_pre: torch.Tensor,
    h_post: torch.Tensor,
    h_res: torch.Tensor,
    sublayer: Sublayer,
) -> torch.Tensor:
    """The general update x' = H_res x + H_post^T F(H_pre x), per token.

    x: (B, T, n, C); h_pre, h_post: (B, T, n); h_res: (B, T, n, n).
    """
    read = torch.cat([h_pre.unsqueeze(-2), h_res], dim=-2)  # (B, T, 1 + n, n): [H_pre; H_res]
    return mix_read(x, read, h_post, sublayer)


class _RmsProjection(torch.autograd.Function):
    """RMSNorm(v) @ W computed as (v @ W) / rms(v), rms(v) = sqrt(mean(v^2) + eps).

    v: (M, D), W: (D, K) with K small (the norm weight already folded into W). Only the
    (M, K) product is written in the forward; the backward writes one (M, D) gradient:
    dv = (g / rms) @ W^T - v * sum_k(g * p)_m / (D rms^3), with p = v @ W.
    """

    @staticmethod
    def forward(ctx, v: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        # one reduction, no (M, D) temporary of squares
        inv_rms = torch.rsqrt(torch.linalg.vector_norm(v, dim=-1, keepdim=True).square() / v.shape[-1] + eps)
        # (W^T v^T)^T: for K << D, MKL is several times faster with the tall v on the right
        proj = (weight.t() @ v.t()).t()  # (M, K)
        ctx.save_for_backward(v, weight, inv_rms, proj)
        # row-major again: elementwise ops downstream keep a transposed layout, and batched
        # matmuls with per-token coefficients in that layout fall back to one matmul per token
        return (proj * inv_rms).contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        v, weight, inv_rms, proj = ctx.saved_tensors
        dtype = torch.promote_types(grad.dtype, v.dtype)  # under autocast proj may be bf16
        grad, v, weight, inv_rms, proj = (t.to(dtype) for t in (grad, v, weight, inv_rms, proj))
        grad_proj = grad * inv_rms  # (M, K)
        grad_v = grad_weight = None
        if ctx.needs_input_grad[0]:
            # d(1/rms)/dv = -v / (D rms^3)
            coef = -(grad * proj).sum(-1, keepdim=True) * inv_rms.pow(3) / v.shape[-1]  # (M, 1)
            grad_v = (grad_proj @ weight.t()).addcmul_(v, coef)  # (M, D), no v * coef temporary
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_proj.t() @ v).t()  # (D, K), same layout trick as the forward
        return grad_v, grad_weight, None


def rms_projection(v: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm(v) @ weight (norm weight folded into `weight`) for v: (..., D) -> (..., K)."""
    flat = v.reshape(-1, v.shape[-1])  # (M, D)
    return _RmsProjection.apply(flat, weight, eps).view(*v.shape[:-1], weight.shape[-1])
