"""The faster paths of round 5 compute the same numbers as the plain ones (BENCHMARKS.md)."""

from __future__ import annotations

import pytest
import torch

from mhc_lab.nn.model import build_model

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
