"""The fused HC and mHC kernels as torch.library custom ops, so torch.compile calls them.

Legend: ... = leading dims (B, T), n = residual streams, C = d_model, K = 2n + n^2.

torch.compile cannot trace the native kernels (ctypes calls on data pointers). Registered as
custom ops, each with a fake implementation (output shapes only) and an autograd formula,
they enter the compiled graph as opaque calls and Inductor compiles everything around them
(the parameter folding, the projection matmul, the write, the sublayers):

- `mhc_lab::hc_read` (x, W^T, A, B, s_alpha, s_beta) -> (H_pre x, H_res x, H_post, H_res, p,
  1/rms), backward `mhc_lab::hc_read_backward` plus the parameter sums of
  `fused.hc_param_grads`;
- `mhc_lab::mhc_read` (x, vec(x) @ phi, bias) -> (H_pre x, H_res x, H_post, H_res, logits,
  1/rms), backward `mhc_lab::mhc_read_backward` (the projection's own backward is the traced
  matmul's).

The values are those of the eager Functions in `fused.py` (the same kernels); eager runs call
those Functions directly, since a custom op's dispatch costs more than the autograd node it
replaces (BENCHMARKS.md, round 5). tests/test_compiled.py checks the ops with
`torch.library.opcheck` and the compiled connections against the plain equations.

A CUDA kernel plugs in here: register it for the same op and signature, e.g.
`hc_read.register_kernel("cuda")(fn)` and `hc_read_backward.register_kernel("cuda")(fn_bwd)`,
and widen `compiled_path_ok`; the fake implementations and autograd formulas serve every
device.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.compiler import is_compiling

from . import native
from .fused import hc_param_grads, output_grads


@torch.compiler.assume_constant_result
def _kernels_built() -> bool:
    """Whether the native kernels built and loaded (evaluated once per compilation)."""
    return native.library() is not None


def compiled_path_ok(x: torch.Tensor, param: nn.Parameter) -> bool:
    """True if, while torch.compile traces, a layer with streams x (..., n, C) can call the
    custom ops: CPU, float32/float64 x of the parameter's dtype, n within the kernels' limit,
    kernels built. Everything it reads is static for the compiled graph."""
    if not is_compiling() or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return False
    return x.dtype == param.dtype and x.shape[-2] <= native.MAX_STREAMS and _kernels_built()


def _contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


# -- HC -----------------------------------------------------------------------------------------


@torch.library.custom_op("mhc_lab::hc_read", mutates_args=(), device_types="cpu")
def hc_read(
    x: Tensor, weight_t: Tensor, static_alpha: Tensor, static_beta: Tensor, gate_alpha: Tensor,
    gate_beta: Tensor, use_tanh: bool, eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`native.hc_forward`: x (..., n, C), weight_t (n + 2, C) = (w * [W_m | W_r | W_beta])^T,
    static_alpha (n, n + 1), static_beta (n,), the gates 0-dim tensors."""
    return native.hc_forward(x.contiguous(), weight_t.contiguous(), static_alpha.contiguous(),
                             static_beta.contiguous(), float(gate_alpha), float(gate_beta), use_tanh, eps)


@hc_read.register_fake
def _(x, weight_t, static_alpha, static_beta, gate_alpha, gate_beta, use_tanh, eps):
    *lead, n, c = x.shape
    return (x.new_empty(*lead, c), x.new_empty(*lead, n, c), x.new_empty(*lead, n),
            x.new_empty(*lead, n, n), x.new_empty(*lead, n, n + 2), x.new_empty(*lead, n))


@torch.library.custom_op("mhc_lab::hc_read_backward", mutates_args=(), device_types="cpu")
def hc_read_backward(
    x: Tensor, weight_t: Tensor, static_alpha: Tensor, gate_alpha: Tensor, gate_beta: Tensor,
    use_tanh: bool, p: Tensor, inv: Tensor, grad_in: Tensor, grad_mixed: Tensor,
    grad_post: Optional[Tensor], grad_hres: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`native.hc_backward`: grad_x (..., n, C), the per-token dL/dalpha (..., n, n + 1),
    inv * dL/dp (..., n, n + 2) and the per-token parts of dL/ds_alpha, dL/ds_beta (..., 2)."""
    return native.hc_backward(
        x.contiguous(), weight_t.contiguous(), static_alpha.contiguous(), float(gate_alpha), float(gate_beta),
        use_tanh, p.contiguous(), inv.contiguous(), grad_in.contiguous(), grad_mixed.contiguous(),
        _contiguous(grad_post), _contiguous(grad_hres),
    )


@hc_read_backward.register_fake
def _(x, weight_t, static_alpha, gate_alpha, gate_beta, use_tanh, p, inv, grad_in, grad_mixed, grad_post, grad_hres):
    *lead, n, _ = x.shape
    return torch.empty_like(x), x.new_empty(*lead, n, n + 1), x.new_empty(*lead, n, n + 2), x.new_empty(*lead, 2)


def _hc_setup(ctx, inputs, output) -> None:
    x, weight_t, static_alpha, _, gate_alpha, gate_beta, use_tanh, _ = inputs
    ctx.mark_non_differentiable(output[4], output[5])  # p and 1/rms: kept for the backward
    ctx.save_for_backward(x, weight_t, static_alpha, gate_alpha, gate_beta, output[4], output[5])
    ctx.use_tanh = use_tanh


def _hc_backward(ctx, grad_in, grad_mixed, grad_post, grad_hres, _grad_p, _grad_inv):
    x, weight_t, static_alpha, gate_alpha, gate_beta, p, inv = ctx.saved_tensors
    grad_in, grad_mixed, grad_post, grad_hres = output_grads(x, grad_in, grad_mixed, grad_post, grad_hres)
    grad_x, grad_alpha, dp_scaled, gate_parts = hc_read_backward(
        x, weight_t, static_alpha, gate_alpha, gate_beta, ctx.use_tanh, p, inv, grad_in, grad_mixed, grad_post, grad_hres
    )
    grad_weight_t, *rest = hc_param_grads(x, grad_alpha, dp_scaled, gate_parts, grad_post)
    return (grad_x, grad_weight_t, *rest, None, None)


torch.library.register_autograd("mhc_lab::hc_read", _hc_backward, setup_context=_hc_setup)


# -- mHC ----------------------------------------------------------------------------------------


@torch.library.custom_op("mhc_lab::mhc_read", mutates_args=(), device_types="cpu")
def mhc_read(x: Tensor, raw: Tensor, bias: Tensor, eps: float, iters: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`native.mhc_forward`: x (..., n, C), raw = vec(x) @ phi (..., K), bias (K,)."""
    return native.mhc_forward(x.contiguous(), raw.contiguous(), bias.contiguous(), eps, iters)


@mhc_read.register_fake
def _(x, raw, bias, eps, iters):
    *lead, n, c = x.shape
    return (x.new_empty(*lead, c), x.new_empty(*lead, n, c), x.new_empty(*lead, n),
            x.new_empty(*lead, n, n), torch.empty_like(raw), x.new_empty(lead))


@torch.library.custom_op("mhc_lab::mhc_read_backward", mutates_args=(), device_types="cpu")
def mhc_read_backward(
    x: Tensor, logits: Tensor, inv: Tensor, bias: Tensor, iters: int, grad_in: Tensor, grad_mixed: Tensor,
    grad_post: Optional[Tensor], grad_hres: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    """`native.mhc_backward`: grad_x (..., n, C) without the projection's term, dL/dlogits."""
    return native.mhc_backward(
        x.contiguous(), logits.contiguous(), inv.contiguous(), bias.contiguous(), iters, grad_in.contiguous(),
        grad_mixed.contiguous(), _contiguous(grad_post), _contiguous(grad_hres),
    )


@mhc_read_backward.register_fake
def _(x, logits, inv, bias, iters, grad_in, grad_mixed, grad_post, grad_hres):
    return torch.empty_like(x), torch.empty_like(logits)


def _mhc_setup(ctx, inputs, output) -> None:
    x, _, bias, _, iters = inputs
    ctx.mark_non_differentiable(output[4], output[5])  # logits and 1/rms: kept for the backward
    ctx.save_for_backward(x, bias, output[4], output[5])
    ctx.iters = iters


def _mhc_backward(ctx, grad_in, grad_mixed, grad_post, grad_hres, _grad_logits, _grad_inv):
    x, bias, logits, inv = ctx.saved_tensors
    grad_in, grad_mixed, grad_post, grad_hres = output_grads(x, grad_in, grad_mixed, grad_post, grad_hres)
    grad_x, dlogits = mhc_read_backward(x, logits, inv, bias, ctx.iters, grad_in, grad_mixed, grad_post, grad_hres)
    # logits = inv * raw + bias: dL/draw = inv * dL/dlogits; the matmul raw = vec(x) @ phi
    # before the op is traced, and autograd adds its term to dL/dx
    return grad_x, dlogits * inv.unsqueeze(-1), dlogits.reshape(-1, dlogits.shape[-1]).sum(0), None, None


torch.library.register_autograd("mhc_lab::mhc_read", _mhc_backward, setup_context=_mhc_setup)
