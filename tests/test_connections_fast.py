"""The lean connection paths equal a plain transcription of the equations (DESIGN.md section 2),
forward and gradients, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mhc_lab.nn import fused, mixing, sinkhorn
from mhc_lab.nn.connections import HyperConnection, ManifoldHyperConnection
from mhc_lab.nn.mixing import _RmsProjection, _StreamRead, _StreamWrite, mix_streams, rms_projection
from mhc_lab.nn.sinkhorn import sinkhorn_log_iterations

# every test here runs twice: with the fused CPU kernels and with the torch ops
pytestmark = pytest.mark.usefixtures("kernel_path")

B, T, C = 2, 3, 8


def reference_mix(x, h_pre, h_post, h_res, sublayer):
    """x' = H_res x + H_post^T F(H_pre x), written out with einsum."""
    layer_out = sublayer(torch.einsum("btn,btnc->btc", h_pre, x))
    return torch.einsum("btij,btjc->btic", h_res, x) + torch.einsum("btn,btc->btnc", h_post, layer_out)


def reference_hc(conn: HyperConnection, x: torch.Tensor):
    """HC coefficients as in the docstring: Hbar = RMSNorm(x) per stream, then tanh terms."""
    alpha, beta = conn.static_alpha, conn.static_beta
    if conn.dynamic:
        h_bar = F.rms_norm(x, (x.shape[-1],), conn.norm.weight, conn.norm.eps)
        d_alpha = h_bar @ conn.dynamic_alpha
        d_beta = h_bar @ conn.dynamic_beta
        if conn.use_tanh:
            d_alpha, d_beta = torch.tanh(d_alpha), torch.tanh(d_beta)
        alpha = conn.gate_alpha * d_alpha + alpha
        beta = conn.gate_beta * d_beta + beta
    else:
        alpha = alpha.expand(*x.shape[:2], *alpha.shape)
        beta = beta.expand(*x.shape[:3])
    return alpha[..., 0], beta, alpha[..., 1:].transpose(-1, -2)


def reference_mhc(conn: ManifoldHyperConnection, x: torch.Tensor):
    """mHC coefficients as in the docstring: RMSNorm over nC, three gated projections."""
    n = conn.n
    v = F.rms_norm(x.flatten(-2), (x.shape[-2] * x.shape[-1],), conn.norm_weight, conn.eps)
    pre, post, res = (v @ conn.dynamic_phi).split([n, n, n * n], dim=-1)
    h_pre = torch.sigmoid(conn.gate_pre * pre + conn.bias_pre)
    h_post = 2 * torch.sigmoid(conn.gate_post * post + conn.bias_post)
    logits = conn.gate_res * res.unflatten(-1, (n, n)) + conn.bias_res
    return h_pre, h_post, torch.exp(sinkhorn_log_iterations(logits, conn.sinkhorn_iters))


class Sublayer(torch.nn.Module):
    """A small sublayer with its own parameters, so gradients flow through F too."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(C, C)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(z))


def _perturbed(conn: torch.nn.Module, seed: int) -> torch.nn.Module:
    """float64 and every parameter moved off its initialisation (zeros would hide terms)."""
    gen = torch.Generator().manual_seed(seed)
    conn = conn.double()
    with torch.no_grad():
        for p in conn.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    return conn


def _check_against_reference(conn, reference, x: torch.Tensor) -> None:
    sub = Sublayer().double()
    out, h_res = conn(x, sub)
    h_pre, h_post, h_res_ref = reference(conn, x)
    out_ref = reference_mix(x, h_pre, h_post, h_res_ref, sub)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h_res, h_res_ref, rtol=1e-10, atol=1e-12)
    grad_out = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(5))
    grad_h = torch.randn(h_res.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(6))
    inputs = [x, *conn.parameters(), *sub.parameters()]
    fast = torch.autograd.grad((out * grad_out).sum() + (h_res * grad_h).sum(), inputs, allow_unused=True)
    ref = torch.autograd.grad((out_ref * grad_out).sum() + (h_res_ref * grad_h).sum(), inputs, allow_unused=True)
    names = ["x", *(n for n, _ in conn.named_parameters()), *(n for n, _ in sub.named_parameters())]
    for name, a, b in zip(names, fast, ref):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)


def _x(n: int, expanded: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(n)
    if expanded:  # the model's first layer: the embedding copied into n streams (a view)
        h = torch.randn(B, T, C, generator=gen, dtype=torch.float64, requires_grad=True)
        return h.unsqueeze(-2).expand(B, T, n, C)
    return torch.randn(B, T, n, C, generator=gen, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("expanded", [False, True])
@pytest.mark.parametrize("dynamic,use_tanh", [(True, True), (True, False), (False, True)])
def test_hc_matches_reference(n, expanded, dynamic, use_tanh):
    conn = _perturbed(HyperConnection(C, n, layer_index=1, dynamic=dynamic, use_tanh=use_tanh), n)
    _check_against_reference(conn, reference_hc, _x(n, expanded))


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("expanded", [False, True])
@pytest.mark.parametrize("iters", [0, 3, 20])
def test_mhc_matches_reference(n, expanded, iters):
    conn = _perturbed(ManifoldHyperConnection(C, n, layer_index=2, sinkhorn_iters=iters), n)
    _check_against_reference(conn, reference_mhc, _x(n, expanded))


@pytest.mark.parametrize("kind", ["hc", "mhc"])
@pytest.mark.parametrize("expanded", [False, True])
def test_compiled_forms_match_reference(kind, expanded, monkeypatch):
    """Under torch.compile the per-token matmuls are broadcast multiply-sums (Inductor fuses
    them): the same checks on that path, taken in eager by pretending to compile."""
    monkeypatch.setattr(mixing, "is_compiling", lambda: True)
    monkeypatch.setattr(fused, "is_compiling", lambda: True)
    monkeypatch.setattr(sinkhorn, "is_compiling", lambda: True)
    if kind == "hc":
        _check_against_reference(_perturbed(HyperConnection(C, 4, layer_index=1), 4), reference_hc, _x(4, expanded))
    else:
        conn = _perturbed(ManifoldHyperConnection(C, 4, layer_index=2, sinkhorn_iters=3), 4)
        _check_against_reference(conn, reference_mhc, _x(4, expanded))
    gen = torch.Generator().manual_seed(3)
    x, r = (torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True) for s in [(5, 3, 4), (5, 4, 3)])
    assert torch.autograd.gradcheck(lambda x, r: _StreamRead.apply(x, r), (x, r))


def test_mix_streams_matches_reference():
    gen = torch.Generator().manual_seed(0)
    shapes = [(B, T, 4, C), (B, T, 4), (B, T, 4), (B, T, 4, 4)]
    args = [torch.randn(s, generator=gen, dtype=torch.float64, requires_grad=True) for s in shapes]
    sub = Sublayer().double()
    out = mix_streams(*args, sub)
    ref = reference_mix(*args, sub)
    torch.testing.assert_close(out, ref)
    for a, b in zip(torch.autograd.grad(out.sum(), args), torch.autograd.grad(ref.sum(), args)):
        torch.testing.assert_close(a, b)


def test_custom_functions_gradcheck():
    gen = torch.Generator().manual_seed(1)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)

    m, n, d = 5, 3, 4
    assert torch.autograd.gradcheck(lambda x, r: _StreamRead.apply(x, r), (rand(m, n, d), rand(m, n + 1, n)))
    assert torch.autograd.gradcheck(_StreamWrite.apply, (rand(m, n, d), rand(m, n), rand(m, d)))
    assert torch.autograd.gradcheck(lambda v, w: _RmsProjection.apply(v, w, 1e-6), (rand(m, 3 * d), rand(3 * d, 2)))


def test_rms_projection_equals_rms_norm_then_matmul():
    gen = torch.Generator().manual_seed(2)
    v = torch.randn(2, 3, 32, generator=gen, dtype=torch.float64)
    w = torch.randn(32, 6, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(rms_projection(v, w, 1e-6), F.rms_norm(v, (32,), eps=1e-6) @ w)


def test_coefficients_come_out_row_major():
    """Transposed per-token coefficients send torch.bmm down a one-matmul-per-token path."""
    v = torch.randn(6, 32)
    assert rms_projection(v, torch.randn(32, 5), 1e-6).is_contiguous()
    conn = ManifoldHyperConnection(8, 4, layer_index=0)
    h_pre, h_post, h_res = conn.coefficients(torch.randn(2, 3, 4, 8))
    assert h_post.is_contiguous() and h_res.is_contiguous()


@pytest.mark.parametrize("kind", ["hc", "mhc"])
def test_backward_keeps_no_storage_larger_than_the_streams(kind):
    """The sublayer saves its input: it must not be a view into the (1 + n)-row read buffer."""
    conn = HyperConnection(C, 4, 0) if kind == "hc" else ManifoldHyperConnection(C, 4, 0)
    x = torch.randn(8, 16, 4, C, requires_grad=True)  # larger than any parameter
    sizes: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        conn(x, torch.nn.Linear(C, C))
    assert max(sizes) <= x.numel() * x.element_size()


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # RMSNorm, bf16 input
@pytest.mark.parametrize("kind", ["hc", "mhc"])
def test_bf16_autocast_forward_and_backward(kind):
    """Under autocast (the training loop's `autocast_bf16`) the custom Functions see mixed
    dtypes: bf16 matmul outputs, float32 streams and gradients."""
    from mhc_lab.nn.model import build_model

    from .conftest import tiny_model_config

    model = build_model(tiny_model_config(connection=kind, n_streams=4), 16, seed=0)
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss, _ = model(idx, idx)
    loss.backward()
    _, ref, _ = model(idx, idx)
    assert abs(loss.item() - ref.item()) < 0.05
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
