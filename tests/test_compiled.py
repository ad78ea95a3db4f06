"""The fused kernels as torch.library custom ops (nn/ops.py): opcheck, and the connections
under torch.compile (and on their compile-only path in eager) against the plain equations."""

from __future__ import annotations

import pytest
import torch

from mhc_lab.nn import ops
from mhc_lab.nn.connections import HyperConnection, ManifoldHyperConnection

from .conftest import require_native
from .test_connections_fast import _check_against_reference, _perturbed, _x, reference_hc, reference_mhc


@pytest.fixture(autouse=True)
def _native():
    require_native()


def _rand(*shape: int, seed: int, grad: bool = False) -> torch.Tensor:
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return t.requires_grad_(grad)


def test_opcheck_hc_ops():
    m, n, c = 6, 3, 5
    x, weight_t = _rand(2, m // 2, n, c, seed=0, grad=True), _rand(n + 2, c, seed=1, grad=True)
    alpha, beta = _rand(n, n + 1, seed=2, grad=True), _rand(n, seed=3, grad=True)
    gates = (torch.tensor(0.3, dtype=torch.float64, requires_grad=True), torch.tensor(-0.2, dtype=torch.float64, requires_grad=True))
    torch.library.opcheck(ops.hc_read, (x, weight_t, alpha, beta, *gates, True, 1e-6))
    y = ops.hc_read(x, weight_t, alpha, beta, *gates, True, 1e-6)
    grads = (_rand(2, m // 2, c, seed=4), _rand(2, m // 2, n, c, seed=5), _rand(2, m // 2, n, seed=6), None)
    torch.library.opcheck(ops.hc_read_backward, (x.detach(), weight_t.detach(), alpha.detach(), *(g.detach() for g in gates), True,
                                                 y[4], y[5], *grads))


def test_opcheck_mhc_ops():
    n, c = 4, 5
    k = 2 * n + n * n
    x, raw, bias = _rand(2, 3, n, c, seed=0, grad=True), _rand(2, 3, k, seed=1, grad=True), _rand(k, seed=2, grad=True)
    torch.library.opcheck(ops.mhc_read, (x, raw, bias, 1e-6, 3))
    y = ops.mhc_read(x, raw, bias, 1e-6, 3)
    grads = (_rand(2, 3, c, seed=4), _rand(2, 3, n, c, seed=5), None, _rand(2, 3, n, n, seed=6))
    torch.library.opcheck(ops.mhc_read_backward, (x.detach(), y[4], y[5], bias.detach(), 3, *grads))


@pytest.mark.parametrize("kind", ["hc", "mhc"])
@pytest.mark.parametrize("expanded", [False, True])
def test_compile_only_path_matches_reference(kind, expanded, monkeypatch):
    """The connections' torch.compile path (the custom ops, the traced folding and write),
    taken in eager by pretending to compile: values and every gradient, float64."""
    monkeypatch.setattr(ops, "is_compiling", lambda: True)
    from mhc_lab.nn import fused

    monkeypatch.setattr(fused, "is_compiling", lambda: True)
    if kind == "hc":
        conn = _perturbed(HyperConnection(8, 4, layer_index=1), 4)
        _check_against_reference(conn, reference_hc, _x(4, expanded))
    else:
        conn = _perturbed(ManifoldHyperConnection(8, 4, layer_index=2, sinkhorn_iters=5), 4)
        _check_against_reference(conn, reference_mhc, _x(4, expanded))
    _, h_res = conn(_x(4, expanded), torch.nn.Linear(8, 8).double())
    assert f"mhc_lab_{kind}_read" in h_res.grad_fn.name()  # the custom op's autograd node


@pytest.mark.parametrize("kind", ["hc", "mhc"])
def test_compiled_model_calls_the_kernels_and_matches_eager(kind):
    """A tiny model under torch.compile (aot_eager: Dynamo and AOTAutograd, no code
    generation, so it compiles in seconds): its graph calls the custom ops, and its loss and
    gradients equal eager's to float rounding."""
    from mhc_lab.nn.model import build_model

    from .conftest import tiny_model_config

    model = build_model(tiny_model_config(connection=kind, n_streams=4, depth=1), 16, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    _, loss, _ = model(idx, idx)
    expected = torch.autograd.grad(loss, list(model.parameters()))
    graphs = []

    def backend(gm, example_inputs):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        graphs.append(str(gm.graph))
        keep = lambda g, _: make_boxed_func(g.forward)  # noqa: E731 (run the traced graphs as they are)
        return aot_autograd(fw_compiler=keep, bw_compiler=keep)(gm, example_inputs)

    torch._dynamo.reset()
    _, compiled_loss, _ = torch.compile(model, backend=backend)(idx, idx)
    got = torch.autograd.grad(compiled_loss, list(model.parameters()))
    assert any(f"mhc_lab.{kind}_read" in g for g in graphs)
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-6, atol=1e-6)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
