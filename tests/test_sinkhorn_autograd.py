"""The custom Sinkhorn autograd Function equals the plain log-domain loop, in value and
gradient, and saves the same memory for backward whatever the number of iterations."""

from __future__ import annotations

import pytest
import torch

from mhc_lab.nn.sinkhorn import sinkhorn_knopp, sinkhorn_log_iterations

# every test here runs twice: with the fused CPU kernels and with the torch ops
pytestmark = pytest.mark.usefixtures("kernel_path")

ITERS = [0, 1, 3, 20]
STREAMS = [1, 2, 4, 8]


def _plain(logits: torch.Tensor, iters: int) -> torch.Tensor:
    return torch.exp(sinkhorn_log_iterations(logits, iters))


def _logits(n: int, scale: float = 2.0, shape: tuple[int, ...] = (3, 5), seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, n, n, generator=gen, dtype=torch.float64) * scale).requires_grad_()


@pytest.mark.parametrize("iters", ITERS)
@pytest.mark.parametrize("n", STREAMS)
def test_gradcheck(n, iters):
    logits = _logits(n, shape=(2,))
    assert torch.autograd.gradcheck(lambda z: sinkhorn_knopp(z, iters), (logits,))


@pytest.mark.parametrize("iters", ITERS)
@pytest.mark.parametrize("n", STREAMS)
def test_value_and_gradient_equal_the_plain_loop(n, iters):
    logits = _logits(n, seed=n + iters)
    grad_out = torch.randn(logits.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    fast = sinkhorn_knopp(logits, iters)
    plain = _plain(logits, iters)
    (g_fast,) = torch.autograd.grad(fast, logits, grad_out)
    (g_plain,) = torch.autograd.grad(plain, logits, grad_out)
    torch.testing.assert_close(fast, plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_fast, g_plain, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("scale", [30.0, 1e4])
def test_gradient_with_wide_logits_is_finite_and_matches(scale):
    """The exp-domain iterations after the first log-domain one stay safe for huge logits."""
    logits = _logits(4, scale=1.0, shape=(16,))
    with torch.no_grad():
        logits.mul_(scale / 3.0)
    grad_out = torch.randn(logits.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (g_fast,) = torch.autograd.grad(sinkhorn_knopp(logits, 20), logits, grad_out)
    (g_plain,) = torch.autograd.grad(_plain(logits, 20), logits, grad_out)
    assert torch.isfinite(g_fast).all()
    torch.testing.assert_close(g_fast, g_plain, rtol=1e-6, atol=1e-9)


def _saved_bytes(fn, logits: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for backward while running fn(logits)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(logits)
    return sum(storages.values())


def test_saved_memory_does_not_grow_with_iterations():
    logits = torch.randn(64, 4, 4, requires_grad=True)
    fast = {t: _saved_bytes(lambda z: sinkhorn_knopp(z, t), logits) for t in (1, 3, 20, 100)}
    plain = {t: _saved_bytes(lambda z: _plain(z, t), logits) for t in (1, 20)}
    assert len(set(fast.values())) == 1, fast
    assert fast[20] == logits.numel() * logits.element_size()  # the logits only
    # The check can fail: the plain loop keeps every iteration.
    assert plain[20] > 10 * plain[1] > 0


def test_half_precision_is_computed_in_float32():
    logits = torch.randn(8, 4, 4) * 3
    out = sinkhorn_knopp(logits.bfloat16(), 20)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), sinkhorn_knopp(logits.bfloat16().float(), 20), atol=4e-3, rtol=0)


def test_non_contiguous_input_and_output_layout():
    base = torch.randn(4, 4, 6, dtype=torch.float64)
    logits = base.permute(2, 0, 1)  # (6, 4, 4), not contiguous
    out = sinkhorn_knopp(logits, 5)
    assert out.is_contiguous()
    torch.testing.assert_close(out, _plain(logits, 5))


@pytest.mark.parametrize("shape", [(6, 1, 1), (1, 4, 4), (3, 4, 4)])
def test_inputs_are_left_alone(shape):
    """The iterations and the backward run in place on their own buffers only: logits or
    gradients that already have the tokens-last layout (n = 1, one token) stay untouched."""
    logits = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(shape, dtype=torch.float64)
    before = logits.detach().clone(), grad_out.clone()
    (g,) = torch.autograd.grad(sinkhorn_knopp(logits, 5), logits, grad_out)
    torch.testing.assert_close((logits.detach(), grad_out), before, rtol=0, atol=0)
    torch.testing.assert_close(g, torch.autograd.grad(_plain(logits, 5), logits, grad_out)[0])
