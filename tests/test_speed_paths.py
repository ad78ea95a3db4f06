"""The faster paths of rounds 5 and 6 compute the same numbers as the plain ones (BENCHMARKS.md)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mhc_lab.nn.model import build_model
from mhc_lab.training.trainer import Trainer

from .conftest import tiny_model_config


@pytest.mark.parametrize("kind", ["residual", "hc", "mhc"])
def test_fused_adamw_updates_like_the_per_tensor_loop(kind):
    """The trainer's AdamW(fused=True) on CPU makes the same update as the default per-tensor
    implementation, to float rounding: three steps on the same gradients, both weight-decay
    groups, parameters compared after each."""
    model = build_model(tiny_model_config(connection=kind, n_streams=4), 16, seed=0)
    twin = build_model(tiny_model_config(connection=kind, n_streams=4), 16, seed=0)
    opts = [torch.optim.AdamW(m.parameter_groups(0.1), lr=3e-2, betas=(0.9, 0.95), fused=f)
            for m, f in ((model, False), (twin, True))]
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p, q in zip(model.parameters(), twin.parameters()):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
            torch.testing.assert_close(q, p, rtol=2e-6, atol=1e-7)
        for opt in opts:
            opt.step()
    start = build_model(tiny_model_config(connection=kind, n_streams=4), 16, seed=0)
    moved = max((p - s).abs().max().item() for p, s in zip(model.parameters(), start.parameters()))
    assert moved > 0.05  # three steps of lr 3e-2 moved the parameters
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(q, p, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("max_norm", [None, 0.5])
def test_the_gradient_norm_is_clip_grad_norms_to_the_bit(max_norm):
    """`Trainer.gradient_norm` returns the norm `clip_grad_norm_` returns and leaves the
    gradients as it leaves them, bit for bit: untouched without a clip (where clip_grad_norm_
    multiplies them by 1.0), scaled to max_norm with one. One parameter has no gradient."""
    models = [build_model(tiny_model_config(connection="hc", n_streams=4), 16, seed=0) for _ in range(2)]
    gen = torch.Generator().manual_seed(2)
    for i, (p, q) in enumerate(zip(*(m.parameters() for m in models))):
        if i == 3:
            continue  # stays None in both
        p.grad = 3.0 * torch.randn(p.shape, generator=gen)
        q.grad = p.grad.clone()
    plain, ours = models
    expected = torch.nn.utils.clip_grad_norm_(plain.parameters(), float("inf") if max_norm is None else max_norm)
    got = Trainer.gradient_norm(SimpleNamespace(model=ours), max_norm)
    assert got == expected.item() and got > 10  # far above the clip: it acts
    for p, q in zip(plain.parameters(), ours.parameters()):
        assert (p.grad is None) == (q.grad is None)
        assert p.grad is None or torch.equal(p.grad, q.grad)
    if max_norm is not None:
        assert torch.nn.utils.get_total_norm([p.grad for p in ours.parameters() if p.grad is not None]).item() == pytest.approx(max_norm, rel=1e-5)
