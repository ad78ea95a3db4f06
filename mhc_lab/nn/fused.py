"""HC's and mHC's coefficients and stream read fused into one native pass (CPU, eager).

Legend: ... = leading dims (B, T), M = their product (tokens), n = residual streams,
C = d_model, K = coefficients per token.

A connection's layer is two autograd nodes: `HcRead` / `MhcRead` (below) and the write
`mixing._StreamWrite`, with the sublayer F between them. The read takes the connection's own
parameters and does everything up to F in one node: it folds the norm weight (and mHC's
gates) into the projection, flattens the streams, and computes the norm, the coefficients
(HC: tanh terms; mHC: sigmoids and Sinkhorn-Knopp) and the read H_pre x, H_res x with one
pass over each token's streams (mhc_lab/nn/native/kernels_impl.h); its backward makes one
pass too and sums the parameter gradients, the folding's included, with a few matmuls and
reductions. mHC's projection, nC x (2n + n^2) per token, stays one matmul each way, where
MKL's blocking wins. Before, the folding and the reshapes around the read and the write made
10 (HC) and 15 (mHC) autograd nodes per layer, each dispatched forward and backward, where
the layer's arithmetic at d_model 64 takes about a millisecond (BENCHMARKS.md, round 5).

The values equal `HyperConnection.alpha_beta` / `ManifoldHyperConnection.coefficients`
followed by `mixing._StreamRead` (tests/test_connections_fast.py runs every path against a
plain transcription of the equations). Under torch.compile the same kernels run as the
custom ops of `ops.py`; these Functions are the eager path, where a custom op's dispatch would
cost more than the node it replaces.

Gradient buffers: every gradient these Functions return is a tensor they allocated; an
incoming gradient (`grad_mixed` may be the very tensor the next layer's backward returned) is
only read, never written, so hooks and `retain_grad` see what autograd computed.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.compiler import is_compiling

from . import native


def fused_path_ok(x: torch.Tensor, param: nn.Parameter) -> bool:
    """True if the fused native path takes a layer with streams x (..., n, C) and a
    parameter of its connection: eager mode, CPU, float32/float64 x of the parameter's
    dtype, n within the kernels' limit, kernels built."""
    if is_compiling() or type(x) is not torch.Tensor or x.device.type != "cpu" or x.dtype != param.dtype:
        return False
    return native.usable(param, streams=x.shape[-2])


def output_grads(
    x: torch.Tensor,
    grad_in: Optional[torch.Tensor],
    grad_mixed: Optional[torch.Tensor],
    grad_post: Optional[torch.Tensor],
    grad_hres: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The four output gradients as the kernels read them: contiguous; the two big ones as
    zeros when autograd passes None, the two small ones left None (the kernels skip them).
    x: (..., n, C)."""
    grad_in = x.new_zeros(x.shape[:-2] + x.shape[-1:]) if grad_in is None else grad_in.contiguous()
    grad_mixed = torch.zeros_like(x) if grad_mixed is None else grad_mixed.contiguous()
    grad_post = None if grad_post is None else grad_post.contiguous()
    grad_hres = None if grad_hres is None else grad_hres.contiguous()
    return grad_in, grad_mixed, grad_post, grad_hres


def hc_param_grads(
    x: torch.Tensor, grad_alpha: torch.Tensor, dp_scaled: torch.Tensor, gate_parts: torch.Tensor,
    grad_post: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """HC's parameter gradients from what `native.hc_backward` leaves per token: dL/dW^T
    (n + 2, C) of the folded weight, dL/dA (n, n + 1), dL/dB (n,), dL/ds_alpha, dL/ds_beta.
    x: (..., n, C); dp_scaled: (..., n, n + 2); grad_alpha (..., n, n + 1); gate_parts (..., 2)."""
    n, c = x.shape[-2:]
    # dL/dW^T = sum over tokens and streams of (inv_i dL/dp_i)^T x_i: (n + 2, C)
    grad_weight_t = dp_scaled.reshape(-1, n + 2).t() @ x.reshape(-1, c)
    grad_static_alpha = grad_alpha.reshape(-1, n, n + 1).sum(0)  # (n, n + 1)
    grad_gates = gate_parts.reshape(-1, 2).sum(0)  # (2,): s_alpha, s_beta
    grad_static_beta = x.new_zeros(n) if grad_post is None else grad_post.reshape(-1, n).sum(0)
    return grad_weight_t, grad_static_alpha, grad_static_beta, grad_gates[0], grad_gates[1]


def hc_fold(
    norm_weight: torch.Tensor, dynamic_alpha: torch.Tensor, dynamic_beta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """HC's projection with RMSNorm's weight folded in: the dynamic weights [W_m | W_r | W_beta]
    (C, n + 2) and w * [W_m | W_r | W_beta] (C, n + 2), so that RMSNorm(x) @ W = x @ (w * W) / rms(x)."""
    dynamic = torch.cat([dynamic_alpha, dynamic_beta.unsqueeze(-1)], dim=-1)  # (C, n + 2)
    return dynamic, norm_weight.unsqueeze(-1) * dynamic


class HcRead(torch.autograd.Function):
    """HC's coefficients and the stream read in one pass over x (native kernels, CPU only):
    the same values as `HyperConnection.alpha_beta` followed by `mixing._StreamRead`, i.e.
    the HC paper's dynamic H_pre, H_post, H_res (tanh terms plus static parts, DESIGN.md
    section 2) and H_pre x, H_res x.

    x: (..., n, C), contiguous or not (the first layer's is an expanded view); the
    connection's parameters as they are: the norm weight w (C,), W_m | W_r (C, n + 1),
    W_beta (C,), A = static_alpha (n, n + 1), B = static_beta (n,), s_alpha, s_beta (0-dim).
    Returns the sublayer input H_pre x (..., C), H_res x (..., n, C), H_post (..., n) and
    H_res (..., n, n). The backward makes one pass over x and the output gradients; what it
    leaves per token is summed here into the parameter gradients.
    """

    @staticmethod
    def forward(ctx, x, norm_weight, dynamic_alpha, dynamic_beta, static_alpha, static_beta,  # type: ignore[override]
                gate_alpha, gate_beta, use_tanh: bool, eps: float):
        x = x.contiguous()  # (..., n, C); the first layer's x is an expanded view
        dynamic, weights = hc_fold(norm_weight, dynamic_alpha, dynamic_beta)
        weight_t = weights.t().contiguous()  # (n + 2, C): (w * W)^T
        gates = (float(gate_alpha), float(gate_beta))
        static_alpha = static_alpha.contiguous()
        y_in, y_mix, h_post, h_res, p, inv = native.hc_forward(
            x, weight_t, static_alpha, static_beta.contiguous(), *gates, use_tanh, eps
        )
        ctx.save_for_backward(x, weight_t, dynamic, norm_weight, static_alpha, p, inv)
        ctx.gates, ctx.use_tanh = gates, use_tanh
        return y_in, y_mix, h_post, h_res

    @staticmethod
    @once_differentiable  # the kernels build no graph: double backward raises, never lies
    def backward(ctx, grad_in, grad_mixed, grad_post, grad_hres):  # type: ignore[override]
        x, weight_t, dynamic, norm_weight, static_alpha, p, inv = ctx.saved_tensors
        n = x.shape[-2]
        grad_in, grad_mixed, grad_post, grad_hres = output_grads(x, grad_in, grad_mixed, grad_post, grad_hres)
        grad_x, grad_alpha, dp_scaled, gate_parts = native.hc_backward(
            x, weight_t, static_alpha, *ctx.gates, ctx.use_tanh, p, inv, grad_in, grad_mixed, grad_post, grad_hres
        )
        grad_weight_t, *static_grads = hc_param_grads(x, grad_alpha, dp_scaled, gate_parts, grad_post)
        grad_weight = grad_weight_t.t()  # (C, n + 2): dL/d(w * W)
        grad_dynamic = grad_weight * norm_weight.unsqueeze(-1)  # (C, n + 2)
        grad_norm_weight = (grad_weight * dynamic).sum(-1)  # (C,)
        grad_static_alpha, grad_static_beta, grad_gate_alpha, grad_gate_beta = static_grads
        return (grad_x, grad_norm_weight, grad_dynamic[:, : n + 1], grad_dynamic[:, n + 1],
                grad_static_alpha, grad_static_beta, grad_gate_alpha, grad_gate_beta, None, None)


def mhc_fold(
    norm_weight: torch.Tensor, dynamic_phi: torch.Tensor, gates: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    biases: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """phi = w * phi_dyn * a (nC, K) with a = [a_pre]*n + [a_post]*n + [a_res]*(K - 2n), the
    bias [b_pre | b_post | vec(b_res)] (K,), and, for the backward, the per-column gates a
    (K,) and the scale w a^T (nC, K). The same values as `ManifoldHyperConnection._folded`."""
    n = biases[0].shape[0]
    k = dynamic_phi.shape[-1]
    a = torch.cat([gates[0].expand(n), gates[1].expand(n), gates[2].expand(k - 2 * n)])  # (K,)
    scale = norm_weight.unsqueeze(-1) * a  # (nC, K)
    bias = torch.cat([biases[0], biases[1], biases[2].flatten()])  # (K,)
    return dynamic_phi * scale, bias, a, scale


class MhcRead(torch.autograd.Function):
    """mHC's coefficients and the stream read with one matmul and one native pass over x
    (CPU only): the same values as `ManifoldHyperConnection.coefficients` followed by
    `mixing._StreamRead`, i.e. the mHC paper's H_pre = sigmoid, H_post = 2 sigmoid,
    H_res = Sinkhorn-Knopp of the gated RMS-normalised projection (DESIGN.md section 2) and
    H_pre x, H_res x.

    x: (..., n, C), contiguous or not; the connection's parameters as they are: the norm
    weight w (nC,), phi (nC, 2n + n^2), the gates a_pre, a_post, a_res (0-dim), the biases
    b_pre, b_post (n,), b_res (n, n). Returns the sublayer input H_pre x (..., C), H_res x
    (..., n, C), H_post (..., n) and H_res (..., n, n). The backward makes one native pass
    (gates, Sinkhorn-Knopp, the read), adds the projection's term with one matmul into its
    own gradient buffer, and sums the parameter gradients.
    """

    @staticmethod
    def forward(ctx, x, norm_weight, dynamic_phi, gate_pre, gate_post, gate_res,  # type: ignore[override]
                bias_pre, bias_post, bias_res, iters: int, eps: float):
        x = x.contiguous()  # (..., n, C); the first layer's x is an expanded view
        n, c = x.shape[-2:]
        phi, bias, a, scale = mhc_fold(norm_weight, dynamic_phi, (gate_pre, gate_post, gate_res), (bias_pre, bias_post, bias_res))
        v = x.view(-1, n * c)  # (M, nC)
        # vec(x) @ phi as (phi^T v^T)^T: MKL is faster with the tall operand on the right; to
        # x's dtype (CPU autocast makes the product bf16), row-major for the kernel
        raw = (phi.t() @ v.t()).t().to(x.dtype).contiguous().view(*x.shape[:-2], -1)  # (..., K)
        y_in, y_mix, h_post, h_res, logits, inv = native.mhc_forward(x, raw, bias, eps, iters)
        ctx.save_for_backward(x, phi, bias, logits, inv, dynamic_phi, norm_weight, a, scale)
        ctx.iters, ctx.bias_res_shape = iters, bias_res.shape
        return y_in, y_mix, h_post, h_res

    @staticmethod
    @once_differentiable  # the kernels build no graph: double backward raises, never lies
    def backward(ctx, grad_in, grad_mixed, grad_post, grad_hres):  # type: ignore[override]
        x, phi, bias, logits, inv, dynamic_phi, norm_weight, a, scale = ctx.saved_tensors
        n, c = x.shape[-2:]
        grad_in, grad_mixed, grad_post, grad_hres = output_grads(x, grad_in, grad_mixed, grad_post, grad_hres)
        grad_x, dlogits = native.mhc_backward(x, logits, inv, bias, ctx.iters, grad_in, grad_mixed, grad_post, grad_hres)
        k = dlogits.shape[-1]
        grad_proj = (dlogits * inv.unsqueeze(-1)).view(-1, k)  # (M, K): dL/d(vec(x) @ phi)
        v = x.view(-1, n * c)
        grad_x.view(-1, n * c).addmm_(grad_proj, phi.t())  # our own buffer: accumulate in place
        grad_phi = (grad_proj.t() @ v).t()  # (nC, K), same layout trick as the forward
        # the folding phi = phi_dyn * (w a^T), backwards
        weighted = grad_phi * dynamic_phi  # (nC, K)
        grad_gates = norm_weight @ weighted  # (K,): per column, then summed per gate
        grad_bias = dlogits.view(-1, k).sum(0)  # (K,)
        return (grad_x, weighted @ a, grad_phi * scale, grad_gates[:n].sum(), grad_gates[n : 2 * n].sum(),
                grad_gates[2 * n :].sum(), grad_bias[:n], grad_bias[n : 2 * n],
                grad_bias[2 * n :].view(ctx.bias_res_shape), None, None)
