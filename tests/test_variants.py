"""The exact doubly-stochastic mHC variants (nn/variants.py), Sinkhorn to a tolerance, and the
constraint diagnostics (probe/constraint.py) follow their equations."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from mhc_lab.experiment.config import DataConfig
from mhc_lab.nn.connections import ManifoldHyperConnection
from mhc_lab.nn.model import build_model
from mhc_lab.nn.sinkhorn import iterations_needed, sinkhorn_knopp
from mhc_lab.nn.variants import (
    KromhcConnection, MhcLiteConnection, OrthostochasticConnection, initial_diagonal, skew_conference_matrix,
)
from mhc_lab.probe.constraint import bound_breakers, constraint_statistics
from mhc_lab.training.data import load_corpus, training_batch

from .conftest import tiny_model_config
from .helpers import cli, write_experiment

SEQ = 32
VARIANTS = {"mhc_lite": MhcLiteConnection, "kromhc": KromhcConnection, "ortho": OrthostochasticConnection}
SIZES = {"mhc_lite": (1, 2, 3, 4, 6), "kromhc": (1, 2, 4, 8), "ortho": (2, 3, 4, 5, 8)}
CASES = [(name, n) for name, sizes in SIZES.items() for n in sizes]


def _make(name: str, n: int, d_model: int = 8):
    return VARIANTS[name](d_model, n, layer_index=1)


@pytest.mark.parametrize("name,n", CASES)
@pytest.mark.parametrize("scale", [1.0, 30.0, 1e4])
def test_exactly_doubly_stochastic_for_any_logits(name, n, scale):
    """Rows and columns sum to 1 within 1e-5 in float32, entries >= 0, also for |logit| 1e4
    (where 20 Sinkhorn iterations leave column sums near 2)."""
    conn = _make(name, n)
    logits = scale * torch.randn(256, conn.res_logits, generator=torch.Generator().manual_seed(n))
    h = conn.residual_matrix(logits)
    assert h.shape == (256, n, n) and h.dtype == torch.float32
    assert h.min() >= 0
    assert (h.sum(-1) - 1).abs().max() < 1e-5
    assert (h.sum(-2) - 1).abs().max() < 1e-5


def test_finite_sinkhorn_fails_where_the_variants_do_not():
    """The contrast the variants exist for: rows 0 and 1 put all but e^-60 of their mass in
    column 0, so 20 Sinkhorn-Knopp iterations leave that column summing to 2 (a single layer's
    backward gain of 2); iterating to a tolerance balances it."""
    logits = torch.tensor([[0.0, -60, -60, -60], [0.0, -60, -60, -60], [0.0, 0, 0, 0], [0.0, 0, 0, 0]])
    assert sinkhorn_knopp(logits, 20).sum(-2)[0] == pytest.approx(2.0, abs=1e-3)
    converged = sinkhorn_knopp(logits, 1000, tol=1e-6)
    assert (converged.sum(-2) - 1).abs().max() <= 1e-6


@pytest.mark.parametrize("name,n", [(name, n) for name, n in CASES if n > 1])
def test_gradcheck_in_float64(name, n):
    conn = _make(name, n).double()
    logits = torch.randn(3, conn.res_logits, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(conn.residual_matrix, (logits,))


def test_mhc_lite_sums_every_permutation_once():
    conn = _make("mhc_lite", 3)
    weights = torch.tensor([[0.1, 0.2, 0.3, 0.15, 0.05, 0.2]])
    h = conn.residual_matrix(weights.log())
    expected = sum(w * torch.eye(3)[list(p)] for w, p in zip(weights[0], itertools.permutations(range(3))))
    assert torch.allclose(h[0], expected, atol=1e-6)


def test_kromhc_is_the_kronecker_product_of_its_factors():
    conn = _make("kromhc", 4)
    a = torch.tensor([0.9, 0.3])
    h = conn.residual_matrix(torch.logit(a)[None])[0]
    u = [torch.tensor([[x, 1 - x], [1 - x, x]]) for x in a]
    assert torch.allclose(h, torch.kron(u[0], u[1]), atol=1e-6)


def test_ortho_is_the_square_of_the_cayley_transform():
    conn = _make("ortho", 3).double()
    logits = torch.tensor([[0.3, -1.2, 0.7]], dtype=torch.float64)
    a = torch.tensor([[0.0, 0.3, -1.2], [-0.3, 0.0, 0.7], [1.2, -0.7, 0.0]], dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64)
    q = (eye - a) @ torch.linalg.inv(eye + a)
    assert torch.allclose(q @ q.T, eye, atol=1e-12)
    assert torch.allclose(conn.residual_matrix(logits)[0], q * q, atol=1e-12)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_skew_conference_matrices(n):
    s = skew_conference_matrix(n)
    assert torch.equal(s, -s.T)
    assert torch.equal(s @ s.T, (n - 1) * torch.eye(n))


@pytest.mark.parametrize("name,n", CASES)
@pytest.mark.parametrize("init_logit", [1.0, 2.0])
def test_initial_h_res_has_mhc_diagonal(name, n, init_logit):
    """Every variant starts at mHC's diagonal e^s / (e^s + n - 1); mhc_lite, and ortho at
    n = 2, 4, 8, start at exactly mHC's matrix."""
    conn = VARIANTS[name](8, n, layer_index=0, init_logit=init_logit)
    h = conn.residual_matrix(conn.bias_res.flatten()[None])[0]
    d = initial_diagonal(init_logit, n) if n > 1 else 1.0
    assert torch.allclose(h.diagonal().mean(), torch.tensor(d), atol=1e-6)
    mhc = ManifoldHyperConnection(8, n, 0, init_logit=init_logit)
    same = mhc.residual_matrix(mhc.bias_res.flatten()[None])[0]
    if name == "mhc_lite" or (name == "ortho" and n in (2, 4, 8)) or n <= 2:
        assert torch.allclose(h, same, atol=1e-6)


def test_ortho_starts_away_from_the_zero_gradient_saddle():
    """At A = 0, H_res = I and d(Q * Q)/dA = 0; the initial bias c S has a gradient."""
    conn = _make("ortho", 4)
    target = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    bias = conn.bias_res.detach().clone().requires_grad_(True)
    (conn.residual_matrix(bias[None])[0] * target).sum().backward()
    assert bias.grad.abs().max() > 1e-2
    zero = torch.zeros_like(bias, requires_grad=True)
    (conn.residual_matrix(zero[None])[0] * target).sum().backward()
    assert zero.grad.abs().max() < 1e-6


@pytest.mark.parametrize("connection", ["mhc_lite", "kromhc", "ortho"])
def test_variant_h_res_is_on_the_forward_path(connection):
    model = build_model(tiny_model_config(connection=connection, n_streams=4), SEQ, seed=0)
    idx = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.connections[0].bias_post.copy_(torch.tensor([6.0, -6.0, 6.0, -6.0]))  # separate the streams
        before = model(idx)[0]
        model.connections[2].bias_res.copy_(3.0 * torch.randn(model.connections[2].bias_res.shape,
                                                             generator=torch.Generator().manual_seed(1)))
        after = model(idx)[0]
    # The streams differ by ~1e-2 after layer 0 (small sublayer outputs at init), so the change
    # is ~1e-4: three orders of magnitude above float32 rounding of the logits.
    assert (before - after).abs().max() > 1e-5


@pytest.mark.parametrize("connection", ["mhc", "mhc_lite", "kromhc", "ortho"])
def test_h_res_gradient_needs_separated_streams(connection):
    """At initialisation all streams of a token are equal, so the loss gradient w.r.t. H_res is
    constant along rows and every doubly-stochastic construction cancels it (rounding only).
    Once the streams differ, H_res's bias gets a gradient orders of magnitude above that."""
    corpus = load_corpus(DataConfig(max_bytes=200_000))
    x, y = training_batch(corpus.train, 4, SEQ, seed=0, step=0)
    model = build_model(tiny_model_config(connection=connection, n_streams=4), SEQ, seed=0)
    model(x, y)[1].backward()
    symmetric = max(c.bias_res.grad.abs().max().item() for c in model.connections)
    assert symmetric < 1e-9
    model.zero_grad()
    with torch.no_grad():
        model.connections[0].bias_post.copy_(torch.tensor([3.0, -3.0, 1.0, -1.0]))
    model(x, y)[1].backward()
    separated = min(model.connections[k].bias_res.grad.abs().max().item() for k in (1, 2))
    assert separated > 1e-7 and separated > 1000 * symmetric


def test_unsupported_expansion_rates_are_refused_in_one_line(tmp_path):
    for connection, n, words in (("mhc_lite", 8, "at most 6"), ("kromhc", 3, "power of 2")):
        exp = write_experiment(tmp_path, {"model": {"connection": connection, "n_streams": n},
                                          "sweep": {"grid": {}}})
        result = cli("run", exp, "--dry-run")
        assert result.exit_code == 2
        line = result.output.strip()
        assert "\n" not in line and "model" in line and words in line, line


# -- Sinkhorn to a tolerance ---------------------------------------------------------------


def _near_permutation(tokens: int, spread: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return -spread * torch.rand(tokens, 4, 4, generator=gen) + spread * torch.eye(4)[[1, 0, 3, 2]]


def test_iterations_needed_is_the_first_count_within_tolerance():
    logits = torch.randn(64, 4, 4, generator=torch.Generator().manual_seed(0))
    needed, done = iterations_needed(logits, 1e-6, 200)
    assert done.all() and needed.min() >= 1
    for token in range(0, 64, 9):
        k = int(needed[token])
        err = lambda iters: (sinkhorn_knopp(logits[token], iters).sum(-2) - 1).abs().max()  # noqa: E731
        assert err(k) <= 1e-6
        if k > 1:
            assert err(k - 1) > 1e-6


def test_sinkhorn_with_tolerance_runs_as_many_iterations_as_the_worst_token_needs():
    logits = torch.randn(32, 4, 4, generator=torch.Generator().manual_seed(2)) * 3
    needed, _ = iterations_needed(logits, 1e-6, 500)
    k = int(needed.max())
    assert 20 < k < 500
    h = sinkhorn_knopp(logits, 500, tol=1e-6)
    assert torch.equal(h, sinkhorn_knopp(logits, k))
    assert (h.sum(-2) - 1).abs().max() <= 1e-6
    capped = sinkhorn_knopp(logits, 5, tol=1e-6)
    assert torch.equal(capped, sinkhorn_knopp(logits, 5))


def test_sinkhorn_tolerance_memory_does_not_grow_with_iterations():
    logits = (3 * torch.randn(64, 4, 4, generator=torch.Generator().manual_seed(3))).requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        sinkhorn_knopp(logits, 5, tol=1e-6).sum().backward()
        five = sum(saved)
        saved.clear()
        sinkhorn_knopp(logits, 500, tol=1e-6).sum().backward()
    assert sum(saved) == five == logits.numel()


def test_near_permutation_logits_hit_the_cap():
    needed, done = iterations_needed(_near_permutation(16, 60.0), 1e-6, 50)
    assert not done.all() and int(needed.max()) == 50


# -- diagnostics -------------------------------------------------------------------------------


def test_probe_diagnostics_per_layer():
    cfg = tiny_model_config(connection="mhc", n_streams=4, sinkhorn_tol=1e-6, sinkhorn_iters=100)
    model = build_model(cfg, SEQ, seed=0)
    capture = model.probe(torch.randint(0, 256, (1, SEQ), generator=torch.Generator().manual_seed(0)))
    stats = constraint_statistics(capture.diagnostics)
    assert len(stats["logit_spread_mean"]) == cfg.layers
    assert stats["logit_spread_max"][0] == pytest.approx(2.0, abs=1e-5)  # b_res: 0 and -s, phi = 0
    assert stats["logit_spread_share30"] == [0.0] * cfg.layers
    assert all(1 <= k <= 100 for k in stats["sinkhorn_iters_max"])
    assert stats["sinkhorn_unconverged"] == [0.0] * cfg.layers
    hc = build_model(tiny_model_config(connection="hc"), SEQ, seed=0)
    assert constraint_statistics(hc.probe(torch.zeros(1, SEQ, dtype=torch.long)).diagnostics) == {}


def test_spread_share_counts_tokens_above_thirty():
    diag = [{"logit_spread": torch.tensor([10.0, 31.0, 40.0, 5.0])}, None]
    stats = constraint_statistics(diag)
    assert stats["logit_spread_share30"] == [0.5, None]
    assert stats["logit_spread_max"] == [40.0, None]


def test_bound_breakers_names_the_layers_and_the_gain_without_them():
    """Ten identity layers, two of which send both streams' mass into column 0 for every token:
    H = [[1, 0], [1, 0]] has column sums 2 and 0. The backward composite of the stack is
    H_8 ... H_3 = [[1, 0], [1, 0]] (gain 2); without layers 3 and 8 it is I (gain 1)."""
    h = torch.eye(2).expand(10, 8, 2, 2).clone()
    h[3] = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    h[8] = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    found = bound_breakers(h, bound=1.6)
    assert found.before == pytest.approx(2.0)
    assert sorted(found.layers) == [3, 8] and found.after == pytest.approx(1.0)
    assert found.single_gains == [pytest.approx(2.0)] * 2
    fine = bound_breakers(torch.eye(2).expand(10, 8, 2, 2), bound=1.6)
    assert fine.layers == [] and fine.before == fine.after == pytest.approx(1.0)


def test_a_short_variants_run_keeps_the_bound_exactly(tmp_path):
    """Trained H_res (moved away from its start) of the exact variants keeps the composite gain
    within 1.001 in both directions; mHC and HC train beside them."""
    exp = write_experiment(tmp_path, {
        "model": {"d_model": 16, "heads": 2, "depth": 3, "mlp_ratio": 2, "n_streams": 4},
        "train": {"steps": 16, "batch_size": 4, "seq_len": 16, "lr": 3e-2, "warmup": 2, "threads": 1},
        "probe": {"every": 8, "val_batches": 1},
        "sweep": {"grid": {"model.connection": ["mhc_lite", "kromhc", "ortho"]}},
    })
    result = cli("run", exp, "--out", tmp_path / "results")
    assert result.exit_code == 0, result.output
    import json

    for summary_path in (tmp_path / "results" / "tiny" / "runs").glob("*/summary.json"):
        summary = json.loads(summary_path.read_text())
        assert summary["max_gain_fwd"] <= 1.001 and summary["max_gain_bwd"] <= 1.001, summary["run_id"]
        probes = [json.loads(line) for line in (summary_path.parent / "probes.jsonl").read_text().splitlines()]
        moved = max(abs(b - a) for a, b in zip(probes[0]["hres"]["identity_dist"], probes[-1]["hres"]["identity_dist"]))
        assert moved > 1e-4, summary["run_id"]
        assert max(probes[-1]["hres"]["col_sum_err"]) < 1e-5
        assert math.isfinite(summary["final_gain_bwd"])


def test_a_subclass_with_its_own_h_res_never_takes_the_fused_sinkhorn_path():
    """The fused native path computes Sinkhorn-Knopp itself: a subclass that builds H_res
    otherwise must not take it (on CPU it would silently compute mHC's H_res instead)."""

    class RowSoftmax(ManifoldHyperConnection):
        def residual_matrix(self, logits):
            return torch.softmax(logits.unflatten(-1, (self.n, self.n)), dim=-1)

    conn = RowSoftmax(8, 4, 0)
    assert not conn.fused_sinkhorn
    assert ManifoldHyperConnection(8, 4, 0).fused_sinkhorn
    assert not ManifoldHyperConnection(8, 4, 0, sinkhorn_tol=1e-6).fused_sinkhorn
    with torch.no_grad():
        conn.bias_res.normal_(0.0, 2.0)
        x = torch.randn(1, 5, 4, 8)
        _, h = conn(x, lambda z: torch.zeros_like(z))
        expected = conn.coefficients(x)[2]
    assert torch.allclose(h, expected, atol=1e-6)
    assert (h.sum(-2) - 1).abs().max() > 1e-2  # row-stochastic only: not what Sinkhorn gives
