"""The gain metric against hand-computed products."""

from __future__ import annotations

import pytest
import torch

from mhc_lab.probe.gain import (
    backward_composites,
    forward_composites,
    gain_metrics,
    matrix_gain,
    per_token_gains,
)


def _layers(*mats) -> torch.Tensor:
    """(L, 1, n, n) from L matrices, one token."""
    return torch.stack([torch.tensor(m, dtype=torch.float64) for m in mats]).unsqueeze(1)


A = [[2.0, 0.0], [1.0, 1.0]]
B = [[1.0, 3.0], [0.0, 1.0]]


def test_single_matrix_gains_by_hand():
    m = torch.tensor([[1.0, -3.0], [2.0, 0.5]], dtype=torch.float64)
    # rows: sums -2, 2.5 -> amax fwd 2.5; abs sums 4, 2.5 -> inf fwd 4
    assert matrix_gain(m, "fwd", "amax").item() == pytest.approx(2.5)
    assert matrix_gain(m, "fwd", "inf").item() == pytest.approx(4.0)
    # columns: sums 3, -2.5 -> amax bwd 3; abs sums 3, 3.5 -> inf bwd 3.5
    assert matrix_gain(m, "bwd", "amax").item() == pytest.approx(3.0)
    assert matrix_gain(m, "bwd", "inf").item() == pytest.approx(3.5)


def test_composites_are_ordered_products():
    h = _layers(A, B)  # H_0 = A, H_1 = B
    a, b = torch.tensor(A, dtype=torch.float64), torch.tensor(B, dtype=torch.float64)
    fwd = forward_composites(h)
    bwd = backward_composites(h)
    assert torch.equal(fwd[0, 0], a) and torch.equal(fwd[1, 0], b @ a)
    assert torch.equal(bwd[1, 0], b) and torch.equal(bwd[0, 0], b @ a)


def test_composite_gains_by_hand():
    # B @ A = [[5, 3], [1, 1]]: row sums 8, 2; column sums 6, 4
    m = gain_metrics(_layers(A, B))
    assert m["composite"]["fwd"]["amax"]["mean"] == pytest.approx([2.0, 8.0])  # rows of A: 2, 2
    assert m["composite"]["bwd"]["amax"]["mean"] == pytest.approx([6.0, 4.0])  # cols of BA; of B: 1, 4
    assert m["single"]["fwd"]["amax"]["mean"] == pytest.approx([2.0, 4.0])
    assert m["single"]["bwd"]["amax"]["mean"] == pytest.approx([3.0, 4.0])
    assert m["headline"]["max_gain"] == pytest.approx(8.0)
    assert m["headline"]["max_gain_layer"] == 1
    assert m["headline"]["max_gain_direction"] == "fwd"
    assert m["headline"]["max_gain_bwd"] == pytest.approx(6.0)


def test_mixed_signs_separate_the_two_definitions():
    c = [[1.0, -1.0], [0.5, 0.5]]  # row sums 0, 1; abs row sums 2, 1
    d = [[2.0, -1.0], [-1.0, 2.0]]  # product d @ c = [[1.5, -2.5], [0, 2]]
    m = gain_metrics(_layers(c, d))
    assert m["composite"]["fwd"]["amax"]["mean"] == pytest.approx([1.0, 2.0])  # |1.5-2.5|=1, 2
    assert m["composite"]["fwd"]["inf"]["mean"] == pytest.approx([2.0, 4.0])  # 4, 2
    assert m["composite"]["bwd"]["amax"]["mean"] == pytest.approx([1.5, 1.0])  # cols of dc: 1.5, -0.5; of d: 1, 1
    assert m["composite"]["bwd"]["inf"]["mean"] == pytest.approx([4.5, 3.0])


def test_per_token_then_mean_and_max():
    h = torch.stack([torch.eye(2) * 1.0, torch.eye(2) * 3.0], dim=0).unsqueeze(0)  # (1, 2, 2, 2)
    m = gain_metrics(h)
    assert m["single"]["fwd"]["amax"]["mean"] == pytest.approx([2.0])
    assert m["single"]["fwd"]["amax"]["max"] == pytest.approx([3.0])


def test_residual_identity_has_gain_one():
    h = torch.ones(12, 7, 1, 1)
    m = gain_metrics(h)
    for kind in ("single", "composite"):
        for d in ("fwd", "bwd"):
            for k in ("amax", "inf"):
                assert m[kind][d][k]["max"] == [1.0] * 12
    assert m["headline"]["max_gain"] == 1.0


def test_products_of_doubly_stochastic_matrices_have_gain_one():
    gen = torch.Generator().manual_seed(0)
    mats = []
    for _ in range(30):  # random convex combinations of permutations (Birkhoff)
        w = torch.rand(5, generator=gen, dtype=torch.float64)
        w = w / w.sum()
        mats.append(sum(wi * torch.eye(4, dtype=torch.float64)[torch.randperm(4, generator=gen)] for wi in w))
    h = torch.stack(mats).unsqueeze(1)
    m = per_token_gains(h)
    for d in ("fwd", "bwd"):
        for k in ("amax", "inf"):
            assert torch.allclose(m["composite"][d][k], torch.ones(30, 1, dtype=torch.float64))


def test_overflow_is_infinite_not_nan():
    big = torch.tensor([[1e200, -1e200], [1e200, 1e200]], dtype=torch.float64)
    h = torch.stack([big, big, big]).unsqueeze(1)
    m = gain_metrics(h)
    assert m["composite"]["fwd"]["amax"]["mean"][-1] == float("inf")


def test_float32_input_is_computed_in_float64():
    h = torch.full((40, 1, 2, 2), 1.0, dtype=torch.float32)  # each layer doubles: 2^40
    m = gain_metrics(h)
    assert m["composite"]["fwd"]["amax"]["mean"][-1] == 2.0**40
