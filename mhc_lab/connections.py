"""The three residual paths between layers: plain residual, HC and mHC.

Legend: B = batch, T = tokens, n = residual streams (expansion rate), C = d_model.

All three share one interface, so the model never branches on the variant: the hidden state
is always a tensor x of shape (B, T, n, C) (n = 1 for the plain residual), and

    x_next, h_res = connection(x, sublayer)

implements the general update of both papers (DESIGN.md section 2):

    x_{l+1} = H_res_l @ x_l  +  H_post_l^T * F(H_pre_l @ x_l)

with every coefficient computed per token. `h_res` is (B, T, n, n), or None for the plain
residual (whose H_res is the constant 1x1 identity).

Speed (see BENCHMARKS.md): the streams are read once for both H_pre x and H_res x (one
batched matmul with R = [H_pre; H_res]); the coefficients come from one skinny matmul with
the norm weight folded in and 1/rms applied after it; three small custom autograd Functions
(`_StreamRead`, `_StreamWrite`, `_RmsProjection`) avoid the full-size temporaries autograd
would write in the backward. tests/test_connections_fast.py checks them against a plain
transcription of the equations, values and gradients.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.compiler import is_compiling

from . import native
from .config import ModelConfig
from .sinkhorn import sinkhorn_knopp

Sublayer = Callable[[torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension, with a learnable weight."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def _per_token_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b per token: a (M, P, Q), b (M, Q, R) -> (M, P, R), with P, Q or R small.

    Eager: torch.bmm. Under torch.compile: a broadcast multiply-sum, which Inductor fuses into
    one loop over the operands; it keeps a bmm as a library call, and batched matmuls of tiny
    per-token matrices run at a fraction of memory bandwidth (BENCHMARKS.md).
    """
    if is_compiling():
        return (a.unsqueeze(-1) * b.unsqueeze(-3)).sum(-2)  # (M, P, Q, 1) * (M, 1, Q, R)
    return torch.bmm(a, b)


def _use_native(*tensors: torch.Tensor, streams: int = 1) -> bool:
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
        if _use_native(x, read, streams=x.shape[1]):
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
        if _use_native(x, read, grad_in, grad_mixed, streams=n):
            return native.read_backward(x, read, grad_in, grad_mixed, *ctx.needs_input_grad)
        grad_y = torch.cat([grad_in.unsqueeze(1), grad_mixed], dim=1)  # (M, 1 + n, C)
        # Under autocast the two gradients and the saved inputs can differ in dtype.
        x, read = x.to(grad_y.dtype), read.to(grad_y.dtype)
        grad_x = _per_token_matmul(read.transpose(1, 2), grad_y) if ctx.needs_input_grad[0] else None
        grad_read = _per_token_matmul(grad_y, x.transpose(1, 2)) if ctx.needs_input_grad[1] else None
        return grad_x, grad_read  # (M, n, C), (M, 1 + n, n)


class _StreamWrite(torch.autograd.Function):
    """out = mixed + H_post^T F per token: mixed (M, n, C), h_post (M, n), F (M, C).

    The backward contracts over C and over n without writing (M, n, C) temporaries
    (autograd's addcmul backward writes two).
    """

    @staticmethod
    def forward(ctx, mixed: torch.Tensor, h_post: torch.Tensor, layer_out: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(h_post, layer_out)
        return torch.addcmul(mixed, h_post.unsqueeze(-1), layer_out.unsqueeze(-2))  # (M, n, C)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        h_post, layer_out = ctx.saved_tensors
        grad = grad.contiguous()  # the last layer's gradient is expanded (streams are summed)
        h_post, layer_out = h_post.to(grad.dtype), layer_out.to(grad.dtype)  # autocast: mixed
        if _use_native(grad, layer_out, h_post, streams=grad.shape[1]):
            return grad, *native.write_backward(grad, layer_out, h_post, *ctx.needs_input_grad[1:])
        grad_post = grad_out = None
        if ctx.needs_input_grad[1]:
            grad_post = torch.linalg.vecdot(grad, layer_out.unsqueeze(-2))  # (M, n): sum over C
        if ctx.needs_input_grad[2]:
            grad_out = _weighted_stream_sum(grad, h_post)  # (M, C): sum over n
        return grad, grad_post, grad_out


def _weighted_stream_sum(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum_i weight[:, i] * x[:, i] for x: (M, n, C), weight: (M, n); returns (M, C).

    One multiply-add per stream: batched (1 x n) @ (n x C) matmuls ran up to 8x slower at
    C = 64 on CPU (about equal at C = 256), see BENCHMARKS.md.
    """
    out = x[:, 0] * weight[:, :1]  # (M, C)
    for i in range(1, x.shape[1]):
        out.addcmul_(x[:, i], weight[:, i : i + 1])
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
    out = _StreamWrite.apply(mixed, h_post, layer_out.reshape(b * t, c))
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


# The fused projection backward (native.projection_grad) for at most this many coefficients:
# HC's 2 + n per stream row. For mHC's 2n + n^2 columns of length nC, MKL's blocked matmul
# plus two passes was as fast or faster (BENCHMARKS.md).
NATIVE_PROJECTION_MAX_K = 8


class _RmsProjection(torch.autograd.Function):
    """RMSNorm(v) @ W computed as (v @ W) / rms(v), rms(v) = sqrt(mean(v^2) + eps); also
    returns v itself, for the stream read to take its input from.

    v: (M, D), W: (D, K) with K small (the norm weight already folded into W). Only the
    (M, K) product is written in the forward; the backward writes one (M, D) gradient:
    dv = dv_read + (g / rms) @ W^T - v * sum_k(g * p)_m / (D rms^3), with p = v @ W and
    dv_read the gradient that came back through the returned v. The matmul adds into
    dv_read, so x's two gradients (read and projection) are summed without another pass.
    """

    @staticmethod
    def forward(ctx, v: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        # one reduction, no (M, D) temporary of squares
        inv_rms = torch.rsqrt(torch.linalg.vector_norm(v, dim=-1, keepdim=True).square() / v.shape[-1] + eps)
        # (W^T v^T)^T: for K << D, MKL is several times faster with the tall v on the right
        proj = (weight.t() @ v.t()).t()  # (M, K)
        ctx.save_for_backward(v, weight, inv_rms, proj)
        # row-major again: elementwise ops downstream keep a transposed layout, and batched
        # matmuls with per-token coefficients in that layout fall back to one matmul per token
        return (proj * inv_rms).contiguous(), v.view_as(v)

    @staticmethod
    def backward(ctx, grad: torch.Tensor, grad_passed: Optional[torch.Tensor]):  # type: ignore[override]
        v, weight, inv_rms, proj = ctx.saved_tensors
        dtype = torch.promote_types(grad.dtype, v.dtype)  # under autocast proj may be bf16
        grad, v, weight, inv_rms, proj = (t.to(dtype) for t in (grad, v, weight, inv_rms, proj))
        grad_proj = grad * inv_rms  # (M, K)
        grad_v = grad_weight = None
        if ctx.needs_input_grad[0]:
            # d(1/rms)/dv = -v / (D rms^3)
            coef = -(grad * proj).sum(-1, keepdim=True) * inv_rms.pow(3) / v.shape[-1]  # (M, 1)
            passed = None if grad_passed is None else grad_passed.reshape(v.shape).to(dtype).contiguous()
            operands = (v, grad_proj, weight, coef) + (() if passed is None else (passed,))
            if weight.shape[1] <= NATIVE_PROJECTION_MAX_K and _use_native(*operands):
                grad_v = native.projection_grad(v, passed, grad_proj, weight, coef)  # one pass
            else:
                grad_v = grad_proj @ weight.t()  # (M, D)
                if passed is not None:
                    grad_v.add_(passed)  # the read's gradient
                grad_v.addcmul_(v, coef)  # no v * coef temporary
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_proj.t() @ v).t()  # (D, K), same layout trick as the forward
        return grad_v, grad_weight, None


def rms_projection(v: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm(v) @ weight (norm weight folded into `weight`) for v: (..., D) -> (..., K),
    and v itself (same values and shape): read the streams from it and the backward sums
    the two gradients of v inside the projection's matmul."""
    flat = v.reshape(-1, v.shape[-1])  # (M, D)
    proj, passed = _RmsProjection.apply(flat, weight, eps)
    return proj.view(*v.shape[:-1], weight.shape[-1]), passed.view(v.shape)


class _HcRead(torch.autograd.Function):
    """HC's coefficients and the stream read in one pass over x (native kernels, CPU only):
    the same values as `HyperConnection.alpha_beta` followed by `_StreamRead`.

    x: (M, n, C); weight: (C, n + 2) = w * [W_m | W_r | W_beta]; static_alpha (n, 1 + n),
    static_beta (n,), gate_alpha, gate_beta: 0-dim. Returns the sublayer input H_pre x (M, C),
    H_res x (M, n, C), H_post (M, n) and H_res (M, n, n). The backward also makes one pass
    over x and the two output gradients; what it leaves per token (the gradient of alpha and
    inv * dL/dp) is summed here into the parameter gradients.
    """

    @staticmethod
    def forward(ctx, x, weight, static_alpha, static_beta, gate_alpha, gate_beta, use_tanh: bool, eps: float):  # type: ignore[override]
        weight_t = weight.t().contiguous()  # (n + 2, C)
        s_a, s_b = float(gate_alpha), float(gate_beta)
        y_in, y_mix, h_post, h_res, p, inv = native.hc_forward(
            x, weight_t, static_alpha.contiguous(), static_beta.contiguous(), s_a, s_b, use_tanh, eps
        )
        ctx.save_for_backward(x, weight_t, static_alpha, p, inv)
        ctx.gates, ctx.use_tanh = (s_a, s_b), use_tanh
        return y_in, y_mix, h_post, h_res

    @staticmethod
    def backward(ctx, grad_in, grad_mixed, grad_post, grad_hres):  # type: ignore[override]
        x, weight_t, static_alpha, p, inv = ctx.saved_tensors
        m, n, c = x.shape
        grad_in = x.new_zeros(m, c) if grad_in is None else grad_in.contiguous()
        grad_mixed = torch.zeros_like(x) if grad_mixed is None else grad_mixed.contiguous()
        grad_post = None if grad_post is None else grad_post.contiguous()
        grad_hres = None if grad_hres is None else grad_hres.contiguous()
        grad_x, grad_alpha, dp_scaled = native.hc_backward(
            x, weight_t, static_alpha.contiguous(), *ctx.gates, ctx.use_tanh, p, inv,
            grad_in, grad_mixed, grad_post, grad_hres,
        )
        t = torch.tanh(p) if ctx.use_tanh else p  # (M, n, n + 2)
        # dL/dW = sum over tokens and streams of x_i^T (inv_i dL/dp_i), as (W^T)^T: (C, n + 2)
        grad_weight = (dp_scaled.reshape(m * n, -1).t() @ x.reshape(m * n, c)).t()
        grad_static_alpha = grad_alpha.sum(0)  # (n, 1 + n)
        grad_gate_alpha = (grad_alpha * t[..., : n + 1]).sum()
        if grad_post is None:
            grad_static_beta = x.new_zeros(n)
            grad_gate_beta = x.new_zeros(())
        else:
            grad_static_beta = grad_post.sum(0)
            grad_gate_beta = (grad_post * t[..., n + 1]).sum()
        return grad_x, grad_weight, grad_static_alpha, grad_static_beta, grad_gate_alpha, grad_gate_beta, None, None


class _MhcRead(torch.autograd.Function):
    """mHC's coefficients and the stream read with one matmul and one native pass over x
    (CPU only): the same values as `ManifoldHyperConnection._coefficients` followed by
    `_StreamRead`.

    x: (M, n, C); phi: (nC, 2n + n^2) with the norm weight and the gates folded in; bias:
    (2n + n^2,) = [b_pre | b_post | vec(b_res)]. Returns the sublayer input H_pre x (M, C),
    H_res x (M, n, C), H_post (M, n) and H_res (M, n, n). The backward makes one native pass
    (gates, Sinkhorn-Knopp, the read) and adds the projection's term with one matmul.
    """

    @staticmethod
    def forward(ctx, x, phi, bias, iters: int, eps: float):  # type: ignore[override]
        m, n, c = x.shape
        v = x.view(m, n * c)
        raw = (phi.t() @ v.t()).t().to(x.dtype).contiguous()  # (M, K): vec(x) @ phi (autocast: bf16)
        y_in, y_mix, h_post, h_res, logits, inv = native.mhc_forward(x, raw, bias.contiguous(), eps, iters)
        ctx.save_for_backward(x, phi, bias, logits, inv)
        ctx.iters = iters
        return y_in, y_mix, h_post, h_res

    @staticmethod
    def backward(ctx, grad_in, grad_mixed, grad_post, grad_hres):  # type: ignore[override]
        x, phi, bias, logits, inv = ctx.saved_tensors
        m, n, c = x.shape
        grad_in = x.new_zeros(m, c) if grad_in is None else grad_in.contiguous()
        grad_mixed = torch.zeros_like(x) if grad_mixed is None else grad_mixed.contiguous()
        grad_post = None if grad_post is None else grad_post.contiguous()
        grad_hres = None if grad_hres is None else grad_hres.contiguous()
        grad_x, dlogits = native.mhc_backward(
            x, logits, inv, bias.contiguous(), ctx.iters, grad_in, grad_mixed, grad_post, grad_hres
        )
        grad_proj = dlogits * inv.unsqueeze(-1)  # (M, K): dL/d(vec(x) @ phi)
        v = x.view(m, n * c)
        grad_x.view(m, n * c).addmm_(grad_proj, phi.t())  # our own buffer: accumulate in place
        grad_phi = (grad_proj.t() @ v).t()  # (nC, K)
        return grad_x, grad_phi, dlogits.sum(0), None, None


class ResidualConnection(nn.Module):
    """Plain pre-norm residual: x + F(x) (n = 1, H_res = H_pre = H_post = 1)."""

    def forward(self, x: torch.Tensor, sublayer: Sublayer) -> tuple[torch.Tensor, None]:
        return x + sublayer(x.squeeze(-2)).unsqueeze(-2), None  # (B, T, 1, C)


class HyperConnection(nn.Module):
    """Hyper-Connections (Zhu et al., arXiv 2409.19606), dynamic variant by default.

    Per token, with Hbar = RMSNorm(x) applied to each stream row (DESIGN.md section 2, HC):

        H_post^T = s_beta  * tanh(Hbar @ W_beta) + B       (W_beta: C x 1, B: 1 x n)
        H_pre^T  = s_alpha * tanh(Hbar @ W_m)    + A_m     (W_m: C x 1,    A_m: n x 1)
        H_res^T  = s_alpha * tanh(Hbar @ W_r)    + A_r     (W_r: C x n,    A_r: n x n)

    Initialisation for layer k: W_* = 0, B = 1, A_m = e_(k mod n), A_r = I,
    s_alpha = s_beta = 0.01, so HC at step 0 equals the pre-norm residual model. Static HC
    (`dynamic=False`) keeps only B, A_m, A_r; `use_tanh=False` drops the tanh. Nothing bounds
    H_res. The paper's norm is LayerNorm; we use RMSNorm, as the rest of the model does.
    Parameter names: `static_*` are B, A_m, A_r (no weight decay), `dynamic_*` the W's.
    """

    def __init__(
        self,
        d_model: int,
        n_streams: int,
        layer_index: int,
        dynamic: bool = True,
        use_tanh: bool = True,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        n = n_streams
        self.dynamic = dynamic
        self.use_tanh = use_tanh
        a_m = torch.zeros(n, 1)
        a_m[layer_index % n, 0] = 1.0
        # A = [A_m | A_r]: row i holds stream i's read weight and its row of H_res^T.
        self.static_alpha = nn.Parameter(torch.cat([a_m, torch.eye(n)], dim=1))  # (n, 1 + n)
        self.static_beta = nn.Parameter(torch.ones(n))  # B: (n,)
        if dynamic:
            self.norm = RMSNorm(d_model, eps)
            self.dynamic_alpha = nn.Parameter(torch.zeros(d_model, 1 + n))  # [W_m | W_r]
            self.dynamic_beta = nn.Parameter(torch.zeros(d_model))  # W_beta
            self.gate_alpha = nn.Parameter(torch.tensor(0.01))  # s_alpha
            self.gate_beta = nn.Parameter(torch.tensor(0.01))  # s_beta

    def alpha_beta(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A = [H_pre^T | H_res^T] (B, T, n, 1 + n) and H_post^T (B, T, n) for x: (B, T, n, C),
        and x as passed through the projection (`rms_projection`), to read the streams from.

        RMSNorm's weight and 1/rms are applied around one matmul with [W_m | W_r | W_beta]
        (x @ (w * W) / rms(x) = RMSNorm(x) @ W), so the normalised Hbar is never stored.
        """
        alpha = self.static_alpha  # (n, 1 + n)
        beta = self.static_beta  # (n,)
        if not self.dynamic:
            alpha = alpha.expand(*x.shape[:2], *alpha.shape)  # (B, T, n, 1 + n)
            return alpha, beta.expand(*x.shape[:3]), x  # (B, T, n)
        weights = torch.cat([self.dynamic_alpha, self.dynamic_beta.unsqueeze(-1)], dim=-1)
        weights = self.norm.weight.unsqueeze(-1) * weights  # (C, 2 + n): w * [W_m | W_r | W_beta]
        proj, x = rms_projection(x, weights, self.norm.eps)  # (B, T, n, 2 + n): Hbar @ W
        if self.use_tanh:
            proj = torch.tanh(proj)
        alpha = torch.addcmul(alpha, self.gate_alpha, proj[..., :-1])  # s_alpha * tanh(.) + A
        beta = torch.addcmul(beta, self.gate_beta, proj[..., -1])  # s_beta * tanh(.) + B
        return alpha, beta, x

    def coefficients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """H_pre (B, T, n), H_post (B, T, n), H_res (B, T, n, n) for x: (B, T, n, C)."""
        alpha, beta, _ = self.alpha_beta(x)
        h_pre = alpha[..., 0]  # (B, T, n): H_pre^T
        h_res = alpha[..., 1:].transpose(-1, -2)  # (B, T, n, n): (H_res^T)^T
        return h_pre, beta, h_res

    def forward(self, x: torch.Tensor, sublayer: Sublayer) -> tuple[torch.Tensor, torch.Tensor]:
        if self.dynamic and _use_native(x[:1, :1].contiguous(), self.static_alpha, streams=x.shape[-2]):
            return self._fused_forward(x, sublayer)
        alpha, beta, x = self.alpha_beta(x)
        read = alpha.transpose(-1, -2)  # (B, T, 1 + n, n): A^T = [H_pre; H_res]
        return mix_read(x, read, beta, sublayer), read[..., 1:, :]

    def _fused_forward(self, x: torch.Tensor, sublayer: Sublayer) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` with the coefficients and the read in one native pass (`_HcRead`)."""
        b, t, n, c = x.shape
        weights = torch.cat([self.dynamic_alpha, self.dynamic_beta.unsqueeze(-1)], dim=-1)
        weights = self.norm.weight.unsqueeze(-1) * weights  # (C, 2 + n): w * [W_m | W_r | W_beta]
        x_flat = x.reshape(b * t, n, c).contiguous()  # the first layer's x is an expanded view
        layer_in, mixed, h_post, h_res = _HcRead.apply(
            x_flat, weights, self.static_alpha, self.static_beta, self.gate_alpha, self.gate_beta,
            self.use_tanh, self.norm.eps,
        )
        layer_out = sublayer(layer_in.view(b, t, c))  # (B, T, C): F(H_pre x)
        out = _StreamWrite.apply(mixed, h_post, layer_out.reshape(b * t, c))
        return out.view(b, t, n, c), h_res.view(b, t, n, n)


class ManifoldHyperConnection(nn.Module):
    """Manifold-Constrained Hyper-Connections (DeepSeek, arXiv 2512.24880).

    Per token, with v = vec(x_l) of length nC (DESIGN.md section 2, mHC):

        v'    = RMSNorm(v)
        Hpre~ = a_pre * (v' @ phi_pre) + b_pre,   H_pre  = sigmoid(Hpre~)
        Hpost~= a_post* (v' @ phi_post)+ b_post,  H_post = 2 * sigmoid(Hpost~)
        Hres~ = a_res * mat(v' @ phi_res) + b_res, H_res = SinkhornKnopp(Hres~)

    As in the paper's kernels, phi_pre | phi_post | phi_res are one (nC x (2n + n*n)) matrix,
    the RMSNorm weight (and here the gates a_*) are folded into it and 1/rms(v) is applied
    after the matmul, so RMSNorm(v) is never stored (`rms_projection`). Gates start
    at 0.01 and phi at 0 (the paper does not say; zero makes the start input-independent, as
    in HC). Bias initialisation (the paper does not give one), strength s = `init_logit`:
    b_res = -s off the diagonal, 0 on it, so H_res starts near the identity (diagonal
    e^s / (e^s + n - 1): 0.711 for the default s = 2, n = 4); b_pre = +s for stream k mod n,
    -s elsewhere; b_post = 0. A larger s starts nearer the identity, but its tiny off-diagonal
    entries make Sinkhorn-Knopp converge slowly (a nearly decomposable matrix): with s = 4,
    20 iterations leave column errors about 1000x larger once training perturbs the logits
    (tests/test_model.py), which the composite backward gain multiplies over depth.
    """

    def __init__(
        self,
        d_model: int,
        n_streams: int,
        layer_index: int,
        sinkhorn_iters: int = 20,
        init_logit: float = 2.0,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        n = n_streams
        self.n = n
        self.sinkhorn_iters = sinkhorn_iters
        self.eps = eps
        self.norm_weight = nn.Parameter(torch.ones(n * d_model))  # RMSNorm weight over nC
        self.dynamic_phi = nn.Parameter(torch.zeros(n * d_model, 2 * n + n * n))
        self.gate_pre = nn.Parameter(torch.tensor(0.01))
        self.gate_post = nn.Parameter(torch.tensor(0.01))
        self.gate_res = nn.Parameter(torch.tensor(0.01))
        b_pre = torch.full((n,), -init_logit)
        b_pre[layer_index % n] = init_logit
        self.bias_pre = nn.Parameter(b_pre)
        self.bias_post = nn.Parameter(torch.zeros(n))
        self.bias_res = nn.Parameter(-init_logit * (1.0 - torch.eye(n)))

    def coefficients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """H_pre (B, T, n), H_post (B, T, n), H_res (B, T, n, n) for x: (B, T, n, C)."""
        return self._coefficients(x)[:3]

    def _folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """phi with the RMSNorm weight and the gates a_* folded in, (nC, 2n + n*n), and the
        biases [b_pre | b_post | vec(b_res)], (2n + n*n,)."""
        n = self.n
        gates = torch.cat(
            [self.gate_pre.expand(n), self.gate_post.expand(n), self.gate_res.expand(n * n)]
        )  # (2n + n*n,): a_pre, a_post, a_res per column
        bias = torch.cat([self.bias_pre, self.bias_post, self.bias_res.flatten()])  # (2n + n*n,)
        phi = self.norm_weight.unsqueeze(-1) * self.dynamic_phi * gates  # (nC, 2n + n*n)
        return phi, bias

    def _coefficients(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`coefficients`, and x as passed through the projection (`rms_projection`)."""
        n = self.n
        v = x.flatten(-2)  # (B, T, nC)
        phi, bias = self._folded()
        # a * (RMSNorm(v) @ phi) + b, with 1/rms(v) applied after the matmul: (B, T, 2n + n*n)
        proj, v = rms_projection(v, phi, self.eps)
        logits = proj + bias
        gated = torch.sigmoid(logits[..., : 2 * n])  # (B, T, 2n)
        h_pre = gated[..., :n]  # (B, T, n)
        h_post = 2.0 * gated[..., n:]  # (B, T, n)
        h_res = sinkhorn_knopp(logits[..., 2 * n :].unflatten(-1, (n, n)), self.sinkhorn_iters)
        return h_pre, h_post, h_res, v.view(x.shape)  # h_res: (B, T, n, n)

    def forward(self, x: torch.Tensor, sublayer: Sublayer) -> tuple[torch.Tensor, torch.Tensor]:
        if _use_native(x[:1, :1].contiguous(), self.dynamic_phi, streams=self.n):
            return self._fused_forward(x, sublayer)
        h_pre, h_post, h_res, x = self._coefficients(x)
        return mix_streams(x, h_pre, h_post, h_res, sublayer), h_res

    def _fused_forward(self, x: torch.Tensor, sublayer: Sublayer) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` with the coefficients and the read in one native pass (`_MhcRead`)."""
        b, t, n, c = x.shape
        phi, bias = self._folded()
        x_flat = x.reshape(b * t, n, c).contiguous()  # the first layer's x is an expanded view
        layer_in, mixed, h_post, h_res = _MhcRead.apply(x_flat, phi, bias, self.sinkhorn_iters, self.eps)
        layer_out = sublayer(layer_in.view(b, t, c))  # (B, T, C): F(H_pre x)
        out = _StreamWrite.apply(mixed, h_post, layer_out.reshape(b * t, c))
        return out.view(b, t, n, c), h_res.view(b, t, n, n)


def build_connection(cfg: ModelConfig, layer_index: int) -> nn.Module:
    """The connection of layer `layer_index` (0-based, counting sublayers) for this config."""
    if cfg.connection == "residual":
        return ResidualConnection()
    if cfg.connection == "hc":
        return HyperConnection(
            cfg.d_model, cfg.n_streams, layer_index, cfg.hc_dynamic, cfg.hc_tanh, cfg.norm_eps
        )
    if cfg.connection == "mhc":
        return ManifoldHyperConnection(
            cfg.d_model,
            cfg.n_streams,
            layer_index,
            cfg.sinkhorn_iters,
            cfg.mhc_init_logit,
            cfg.norm_eps,
        )
    raise ValueError(f"unknown connection {cfg.connection!r}")


def is_decayed(name: str, param: nn.Parameter) -> bool:
    """Weight decay goes to weight matrices and the dynamic HC/mHC weights (HC's W_beta is a
    vector, but dynamic), never to static HC/mHC parts, biases, gates or norms (HC paper: the
    static parts get no weight decay, the dynamic ones do)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf.startswith(("static_", "bias_")):
        return False
    return param.ndim >= 2 or leaf.startswith("dynamic_")


def optional_hres(h_res: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """H_res of a layer as (B, T, n, n); the plain residual's is the 1x1 identity."""
    if h_res is not None:
        return h_res
    return torch.ones(*x.shape[:2], 1, 1, dtype=x.dtype, device=x.device)
