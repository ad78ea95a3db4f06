"""The model and its connections follow the papers' equations."""

from __future__ import annotations

import pytest
import torch

from mhc_lab.experiment.config import DataConfig
from mhc_lab.training.data import load_corpus, training_batch
from mhc_lab.probe.gain import gain_metrics
from mhc_lab.nn.model import build_model

from .conftest import tiny_model_config

SEQ = 32


def _tokens(batch: int = 2, seq: int = SEQ, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _copy_shared_weights(src, dst) -> None:
    """Give dst the embeddings, sublayers and final norm of src (connections differ)."""
    dst.token_embedding.load_state_dict(src.token_embedding.state_dict())
    dst.position_embedding.load_state_dict(src.position_embedding.state_dict())
    dst.sublayers.load_state_dict(src.sublayers.state_dict())
    dst.final_norm.load_state_dict(src.final_norm.state_dict())


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("dynamic", [True, False])
def test_hc_at_init_equals_residual_model(n, dynamic):
    # Streams are summed before the final RMSNorm, which removes the factor n exactly only
    # when eps is negligible against the hidden state's mean square: use a tiny eps here.
    eps = 1e-12
    residual = build_model(tiny_model_config(connection="residual", norm_eps=eps), SEQ, seed=0)
    hc = build_model(
        tiny_model_config(connection="hc", n_streams=n, hc_dynamic=dynamic, norm_eps=eps), SEQ, seed=1
    )
    _copy_shared_weights(residual, hc)
    idx = _tokens()
    with torch.no_grad():
        ref, _, _ = residual(idx)
        out, _, _ = hc(idx)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)


def test_hc_differs_from_residual_once_trained_parameters_move():
    residual = build_model(tiny_model_config(connection="residual"), SEQ, seed=0)
    hc = build_model(tiny_model_config(connection="hc", n_streams=4), SEQ, seed=1)
    _copy_shared_weights(residual, hc)
    with torch.no_grad():
        hc.connections[1].static_beta.mul_(1.5)
        assert not torch.allclose(hc(_tokens())[0], residual(_tokens())[0], atol=1e-3)


@pytest.mark.parametrize("connection", ["hc", "mhc"])
def test_hres_is_on_the_forward_path(connection):
    """Changing only an H_res bias must change the output (the trap of DESIGN.md section 4)."""
    model = build_model(tiny_model_config(connection=connection, n_streams=4), SEQ, seed=0)
    idx = _tokens()
    with torch.no_grad():
        # At init every stream holds the same vector, which any row-stochastic H_res leaves
        # unchanged; let layer 0 write different amounts into the streams first.
        if connection == "mhc":
            model.connections[0].bias_post.copy_(torch.tensor([6.0, -6.0, 6.0, -6.0]))
        before, _, _ = model(idx)
        conn = model.connections[2]
        if connection == "hc":
            conn.static_alpha[:, 1:].add_(torch.tensor([[0.0, 0.5, 0.0, 0.0]] * 4))
        else:
            conn.bias_res.copy_(10.0 * torch.eye(4)[[1, 2, 3, 0]])  # near a cyclic shift
        after, _, _ = model(idx)
    assert (before - after).abs().max() > 1e-3


def test_hc_hres_parameters_get_gradients_and_move_on_real_data():
    """HC's H_res is unconstrained: its static and dynamic parameters get a gradient well above
    rounding from step 0 (measured ~3e-4; float32 rounding of these sums is below 1e-9).
    mHC and its variants cannot at step 0, where every stream is equal: see
    tests/test_variants.py::test_h_res_gradient_needs_separated_streams."""
    corpus = load_corpus(DataConfig(max_bytes=200_000))
    model = build_model(tiny_model_config(connection="hc", n_streams=4), SEQ, seed=0)
    x, y = training_batch(corpus.train, 4, SEQ, seed=0, step=0)
    params = {f"{k}.{name}": getattr(conn, name) for k, conn in enumerate(model.connections)
              for name in ("static_alpha", "dynamic_alpha")}
    before = {k: p.detach().clone() for k, p in params.items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _, loss, _ = model(x, y)
    loss.backward()
    for key, p in params.items():
        assert p.grad is not None and p.grad.abs().max() > 1e-6, f"{key}: gradient {p.grad.abs().max():.1e}"
    opt.step()
    for key, p in params.items():
        assert not torch.equal(p.detach(), before[key]), f"{key} did not move"
    # The gates multiply zero-initialised projections, so their first gradient is zero by
    # construction; from the second step on they learn too.
    opt.zero_grad()
    model(x, y)[1].backward()
    assert all(conn.gate_alpha.grad.abs() > 1e-8 for conn in model.connections)


@pytest.mark.parametrize("connection", ["hc", "mhc", "mhc_lite", "kromhc", "ortho"])
def test_hres_moves_after_a_few_steps(connection):
    """H_res itself moves in training, not only its parameters, and the gradient that moves it
    is far above the rounding noise it starts from (for the doubly-stochastic kinds, once the
    streams have separated)."""
    corpus = load_corpus(DataConfig(max_bytes=200_000))
    model = build_model(tiny_model_config(connection=connection, n_streams=4), SEQ, seed=0)
    x, _ = training_batch(corpus.train, 4, SEQ, seed=0, step=0)
    with torch.no_grad():
        h_before = model(x, return_hres=True)[2]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(1, 9):
        opt.zero_grad()
        model(*training_batch(corpus.train, 4, SEQ, seed=0, step=step))[1].backward()
        opt.step()
    name = "static_alpha" if connection == "hc" else "bias_res"
    grad = max(getattr(c, name).grad.abs().max().item() for c in model.connections)
    assert grad > 1e-9  # rounding at step 0 is ~1e-11 for the doubly-stochastic kinds
    with torch.no_grad():
        h_after = model(x, return_hres=True)[2]
    assert (h_after - h_before).abs().max() > 1e-4  # float32 noise is ~1e-7


def test_initialisation_values_are_pinned():
    """The gates a_* (HC: s_alpha, s_beta) start at 0.01; mHC's bias at strength s = 2:
    b_res = -2 off the diagonal, 0 on it; b_pre = +2 for stream k mod n, -2 elsewhere; b_post = 0."""
    hc = build_model(tiny_model_config(connection="hc", n_streams=4), SEQ, seed=0)
    for conn in hc.connections:
        assert conn.gate_alpha.item() == pytest.approx(0.01) and conn.gate_beta.item() == pytest.approx(0.01)
    mhc = build_model(tiny_model_config(connection="mhc", n_streams=4), SEQ, seed=0)
    for k, conn in enumerate(mhc.connections):
        for gate in (conn.gate_pre, conn.gate_post, conn.gate_res):
            assert gate.item() == pytest.approx(0.01)
        assert torch.equal(conn.bias_res, -2.0 * (1.0 - torch.eye(4)))
        expected_pre = torch.full((4,), -2.0)
        expected_pre[k % 4] = 2.0
        assert torch.equal(conn.bias_pre, expected_pre)
        assert torch.equal(conn.bias_post, torch.zeros(4))
        assert torch.equal(conn.dynamic_phi, torch.zeros_like(conn.dynamic_phi))


@pytest.mark.parametrize("connection", ["hc", "mhc", "mhc_lite", "kromhc", "ortho"])
def test_last_state_is_the_captured_composite_applied_to_the_first(connection, kernel_path):
    """With every sublayer's output zeroed, x_L = H_(L-1) ... H_0 x_0 per token, for per-token,
    non-symmetric H_res (not a scaled identity): the captured H_res are the ones the forward
    pass applied, in the order the composite gain multiplies them. Both code paths."""
    torch.manual_seed(0)
    model = build_model(tiny_model_config(connection=connection, n_streams=4, depth=3), SEQ, seed=0).double()
    _silence_sublayers(model)
    with torch.no_grad():
        for conn in model.connections:
            if connection == "hc":
                conn.static_alpha[:, 1:].add_(0.3 * torch.randn(4, 4, dtype=torch.float64))
                conn.dynamic_alpha.normal_(0.0, 0.5)
                conn.gate_alpha.fill_(0.5)
            else:
                conn.bias_res.normal_(0.0, 1.0)
                conn.dynamic_phi.normal_(0.0, 0.3)
                conn.gate_res.fill_(1.0)
        idx = _tokens(batch=2)
        x0 = model._embed(idx) + 0.1 * torch.randn(2, SEQ, 4, model.cfg.d_model, dtype=torch.float64)
        x, captured = x0, []
        for sublayer, conn in zip(model.sublayers, model.connections):
            x, h = conn(x, sublayer)
            captured.append(h.reshape(2 * SEQ, 4, 4))
        hres = torch.stack(captured)  # (L, T, n, n)
    if connection != "kromhc":  # KromHC's 2x2 factors are symmetric, and so is their Kronecker product
        assert not torch.allclose(hres[1, 0], hres[1, 0].T, atol=1e-3)  # not symmetric
    assert not torch.allclose(hres[1, 0], hres[1, 1], atol=1e-6)  # per token
    from mhc_lab.probe.gain import forward_composites

    composite = forward_composites(hres)[-1]  # (T, n, n): H_(L-1) ... H_0
    expected = composite @ x0.reshape(2 * SEQ, 4, -1)
    assert torch.allclose(x.reshape(2 * SEQ, 4, -1), expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("connection,n", [("residual", 1), ("hc", 4), ("mhc", 4), ("mhc", 2)])
def test_captured_hres_shape_and_per_token(connection, n):
    cfg = tiny_model_config(connection=connection, n_streams=n)
    model = build_model(cfg, SEQ, seed=0)
    idx = _tokens(batch=2)
    with torch.no_grad():
        logits, _, h = model(idx, return_hres=True)
        _, _, none = model(idx)
    assert none is None
    assert logits.shape == (2, SEQ, 256)
    assert h.shape == (cfg.layers, 2 * SEQ, n, n)
    if connection == "residual":
        assert torch.equal(h, torch.ones_like(h))


def test_mhc_hres_is_per_token_and_doubly_stochastic():
    model = build_model(tiny_model_config(connection="mhc", n_streams=4), SEQ, seed=0)
    with torch.no_grad():
        for conn in model.connections:
            conn.dynamic_phi.normal_(0, 0.1)  # logits of std ~0.8: see test_sinkhorn
            conn.gate_res.fill_(1.0)
        _, _, h = model(_tokens(batch=1), return_hres=True)
    assert not torch.allclose(h[3, 0], h[3, 1], atol=1e-4), "H_res must vary per token"
    assert torch.allclose(h.sum(-1), torch.ones(h.shape[:-1]), atol=1e-5)
    # columns: finite Sinkhorn on near-identity logits converges slowly (see test_sinkhorn)
    assert torch.allclose(h.sum(-2), torch.ones(h.shape[:-1]), atol=5e-2)
    assert (h >= 0).all()


def test_hc_hres_is_per_token_when_dynamic():
    model = build_model(tiny_model_config(connection="hc", n_streams=4), SEQ, seed=0)
    with torch.no_grad():
        for conn in model.connections:
            conn.dynamic_alpha.normal_(0, 1.0)
        _, _, h = model(_tokens(batch=1), return_hres=True)
    assert not torch.allclose(h[3, 0], h[3, 1], atol=1e-4)


def test_mhc_initialisation_is_near_identity_and_reads_stream_k():
    cfg = tiny_model_config(connection="mhc", n_streams=4, mhc_init_logit=4.0)
    model = build_model(cfg, SEQ, seed=0)
    x = torch.randn(1, 3, 4, cfg.d_model)
    for k, conn in enumerate(model.connections):
        h_pre, h_post, h_res = conn.coefficients(x)
        diag = torch.exp(torch.tensor(4.0)) / (torch.exp(torch.tensor(4.0)) + 3)
        assert torch.allclose(torch.diagonal(h_res, dim1=-2, dim2=-1), diag.expand(1, 3, 4), atol=1e-5)
        assert h_pre[0, 0].argmax().item() == k % 4
        assert h_pre[0, 0, k % 4] > 0.98
        assert torch.allclose(h_post, torch.ones_like(h_post))


def test_default_mhc_initialisation_is_diagonal_dominant():
    """Default strength s = 2: H_res diagonal e^2 / (e^2 + 3) = 0.711, H_pre reads stream k."""
    cfg = tiny_model_config(connection="mhc", n_streams=4)
    model = build_model(cfg, SEQ, seed=0)
    h_pre, _, h_res = model.connections[3].coefficients(torch.randn(1, 3, 4, cfg.d_model))
    e2 = torch.exp(torch.tensor(2.0))
    assert torch.allclose(torch.diagonal(h_res, dim1=-2, dim2=-1), (e2 / (e2 + 3)).expand(1, 3, 4), atol=1e-5)
    assert h_pre[0, 0].argmax().item() == 3


def test_default_init_strength_keeps_finite_sinkhorn_column_errors_small():
    """Why s = 2 and not s = 4: from the nearly decomposable s = 4 start, 20 iterations leave
    column errors orders of magnitude larger when the logits are perturbed as training does."""
    from mhc_lab.nn.sinkhorn import sinkhorn_knopp

    noise = torch.randn(4000, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def median_column_error(s: float) -> float:
        logits = -s * (1.0 - torch.eye(4, dtype=torch.float64)) + noise
        return (sinkhorn_knopp(logits, 20).sum(-2) - 1).abs().amax(-1).median().item()

    default = build_model(tiny_model_config(connection="mhc"), SEQ, seed=0).connections[0]
    s_default = -default.bias_res[0, 1].item()
    assert s_default == 2.0
    assert median_column_error(s_default) < 1e-5
    assert median_column_error(4.0) > 100 * median_column_error(s_default)


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_hc_composite_gain_is_exactly_one_at_init(n):
    model = build_model(tiny_model_config(connection="hc", n_streams=n, depth=6), SEQ, seed=3)
    with torch.no_grad():
        _, _, h = model(_tokens(), return_hres=True)
    head = gain_metrics(h)["headline"]
    assert head["max_gain_fwd"] == 1.0 and head["max_gain_bwd"] == 1.0


def test_weight_decay_groups_exclude_static_parts():
    model = build_model(tiny_model_config(connection="hc", n_streams=4), SEQ, seed=0)
    decay, no_decay = model.parameter_groups(0.1)
    decayed = {id(p) for p in decay["params"]}
    conn = model.connections[0]
    assert id(conn.static_alpha) not in decayed and id(conn.static_beta) not in decayed
    assert id(conn.dynamic_alpha) in decayed and id(conn.dynamic_beta) in decayed  # W_m, W_r, W_beta
    assert id(model.sublayers[0].inner.qkv.weight) in decayed
    assert id(model.sublayers[0].norm.weight) not in decayed
    mhc = build_model(tiny_model_config(connection="mhc", n_streams=4), SEQ, seed=0)
    decayed = {id(p) for p in mhc.parameter_groups(0.1)[0]["params"]}
    assert id(mhc.connections[0].bias_res) not in decayed
    assert id(mhc.connections[0].dynamic_phi) in decayed


def test_initialisation_is_deterministic_from_seed():
    a = build_model(tiny_model_config(connection="mhc"), SEQ, seed=7)
    b = build_model(tiny_model_config(connection="mhc"), SEQ, seed=7)
    c = build_model(tiny_model_config(connection="mhc"), SEQ, seed=8)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.token_embedding.weight, c.token_embedding.weight)


def _silence_sublayers(model) -> None:
    """Zero every sublayer's output projection: F(x) = 0, so x_{l+1} = H_res_l x_l."""
    with torch.no_grad():
        for sublayer in model.sublayers:
            sublayer.inner.proj.weight.zero_()


def test_stream_rms_of_hc_at_init_equals_the_residual_models():
    residual = build_model(tiny_model_config(connection="residual"), SEQ, seed=0)
    hc = build_model(tiny_model_config(connection="hc", n_streams=4), SEQ, seed=1)
    _copy_shared_weights(residual, hc)
    idx = _tokens()
    rms_res, rms_hc = residual.stream_rms(idx), hc.stream_rms(idx)
    assert rms_res.shape == (2 * 2 + 1,) and rms_res.dtype == torch.float64
    assert torch.allclose(rms_res, rms_hc, rtol=1e-5)
    assert not torch.allclose(rms_res[1:], rms_res[:1].expand(4))  # the sublayers add to it


@pytest.mark.parametrize("scale", [1.5, 1e4])  # 1e4: the state (~1e22) is finite, its square is not
def test_stream_rms_grows_by_the_composite_gain_of_a_scaled_hc_identity(scale):
    from mhc_lab.training.trainer import signal_growth

    model = build_model(tiny_model_config(connection="hc", n_streams=4, depth=3), SEQ, seed=0)
    _silence_sublayers(model)
    with torch.no_grad():
        for conn in model.connections:
            conn.static_alpha[:, 1:] *= scale  # A_r = scale I: every layer scales the streams
    rms = model.stream_rms(_tokens())
    expected = torch.tensor(scale, dtype=torch.float64) ** torch.arange(7, dtype=torch.float64)
    assert torch.isfinite(rms).all()
    assert torch.allclose(rms / rms[0], expected, rtol=1e-5)
    assert signal_growth(rms) == pytest.approx(scale ** 6, rel=1e-5)


def test_doubly_stochastic_mixing_never_grows_the_signal_where_hc_mixing_does():
    """H_res doubly stochastic has spectral norm 1, so mHC's mixing (F = 0) cannot raise the
    RMS of any stream state, whatever the logits; HC's unconstrained H_res can."""
    from mhc_lab.nn.connections import HyperConnection, ManifoldHyperConnection

    x = torch.randn(2, 32, 4, 16, generator=torch.Generator().manual_seed(0))
    zero = lambda h: torch.zeros_like(h)  # noqa: E731
    mhc, hc = ManifoldHyperConnection(16, 4, 0), HyperConnection(16, 4, 0)
    with torch.no_grad():
        mhc.bias_res.normal_(0.0, 2.0)
        mhc.dynamic_phi.normal_(0.0, 1.0)
        hc.static_alpha[:, 1:].normal_(0.0, 1.0)
        rms = lambda z: z.square().mean(dim=(-2, -1)).sqrt()  # noqa: E731  per token
        assert torch.all(rms(mhc(x, zero)[0]) <= rms(x) * (1 + 1e-4))
        assert torch.any(rms(hc(x, zero)[0]) > 1.2 * rms(x))
