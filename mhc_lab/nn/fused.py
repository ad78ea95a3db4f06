"""HC's and mHC's coefficients and stream read fused into one native pass (CPU, eager).

Legend: M = tokens (batch * seq), n = residual streams, C = d_model.

Per layer, the unfused path makes several passes over the (M, n, C) stream state: the norm,
the projection, the read, and in the backward as many again, each a separate torch op or
kernel. `HcRead` and `MhcRead` compute the norm, the coefficients (HC: tanh terms; mHC:
sigmoids and Sinkhorn-Knopp) and the read H_pre x, H_res x with one pass over each token's
streams, and the same in the backward (mhc_lab/native/kernels_impl.h). mHC's projection,
nC x (2n + n^2) per token, stays one matmul each way, where MKL's blocking wins. The values
equal `HyperConnection.alpha_beta` / `ManifoldHyperConnection.coefficients` followed by
`mixing._StreamRead` (tests/test_connections_fast.py runs both paths against the equations).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.compiler import is_compiling

from . import native


def fused_path_ok(x: torch.Tensor, param: nn.Parameter) -> bool:
    """True if the fused native path takes a layer with streams x (B, T, n, C) and a
    parameter of its connection: eager mode, CPU, float32/float64 x of the parameter's
    dtype, n within the kernels' limit, kernels built."""
    if is_compiling() or type(x) is not torch.Tensor or x.device.type != "cpu" or x.dtype != param.dtype:
        return False
    return native.usable(param, streams=x.shape[-2])


def _output_grads(
    x: torch.Tensor,
    grad_in: Optional[torch.Tensor],
    grad_mixed: Optional[torch.Tensor],
    grad_post: Optional[torch.Tensor],
    grad_hres: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The four output gradients as the kernels read them: contiguous; the two big ones as
    zeros when autograd passes None, the two small ones left None (the kernels skip them)."""
    m, n, c = x.shape
    grad_in = x.new_zeros(m, c) if grad_in is None else grad_in.contiguous()
    grad_mixed = torch.zeros_like(x) if grad_mixed is None else grad_mixed.contiguous()
    grad_post = None if grad_post is None else grad_post.contiguous()
    grad_hres = None if grad_hres is None else grad_hres.contiguous()
    return grad_in, grad_mixed, grad_post, grad_hres


class HcRead(torch.autograd.Function):
    """HC's coefficients and the stream read in one pass over x (native kernels, CPU only):
    the same values as `HyperConnection.alpha_beta` followed by `mixing._StreamRead`, i.e.
    the HC paper's dynamic H_pre, H_post, H_res (tanh terms plus static parts, DESIGN.md
    section 2) and H_pre x, H_res x.

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
    @once_differentiable  # the kernels build no graph: double backward raises, never lies
    def backward(ctx, grad_in, grad_mixed, grad_post, grad_hres):  # type: ignore[override]
        x, weight_t, static_alpha, p, inv = ctx.saved_tensors
        m, n, c = x.shape
        grad_in, grad_mixed, grad_post, grad_hres = _output_grads(x, grad_in, grad_mixed, grad_post, grad_hres)
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


class MhcRead(torch.autograd.Function):
    """mHC's coefficients and the stream read with one matmul and one native pass over x
    (CPU only): the same values as `ManifoldHyperConnection.coefficients` followed by
    `mixing._StreamRead`, i.e. the mHC paper's H_pre = sigmoid, H_post = 2 sigmoid,
    H_res = Sinkhorn-Knopp of the gated RMS-normalised projection (DESIGN.md section 2) and
    H_pre x, H_res x.

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
    @once_differentiable  # the kernels build no graph: double backward raises, never lies
    def backward(ctx, grad_in, grad_mixed, grad_post, grad_hres):  # type: ignore[override]
        x, phi, bias, logits, inv = ctx.saved_tensors
        m, n, c = x.shape
        grad_in, grad_mixed, grad_post, grad_hres = _output_grads(x, grad_in, grad_mixed, grad_post, grad_hres)
        grad_x, dlogits = native.mhc_backward(
            x, logits, inv, bias.contiguous(), ctx.iters, grad_in, grad_mixed, grad_post, grad_hres
        )
        grad_proj = dlogits * inv.unsqueeze(-1)  # (M, K): dL/d(vec(x) @ phi)
        v = x.view(m, n * c)
        grad_x.view(m, n * c).addmm_(grad_proj, phi.t())  # our own buffer: accumulate in place
        grad_phi = (grad_proj.t() @ v).t()  # (nC, K)
        return grad_x, grad_phi, dlogits.sum(0), None, None
