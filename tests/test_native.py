"""The fused CPU kernels (mhc_lab/native) against the torch ops they replace, their build and
cache, their fallback, and their determinism. The connection and Sinkhorn tests
(test_connections_fast.py, test_sinkhorn_autograd.py) also run once on each path."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mhc_lab.nn import native
from mhc_lab.nn.model import build_model
from mhc_lab.nn.sinkhorn import sinkhorn_log_iterations

from .conftest import require_native, tiny_model_config

DTYPES = [torch.float32, torch.float64]


@pytest.fixture(autouse=True)
def _native():
    require_native()


def _tol(dtype: torch.dtype) -> dict:
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)


def _rand(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# odd widths: tails of every vector loop; n up to the kernels' limit
SHAPES = [(1, 1, 1), (7, 2, 5), (33, 4, 64), (20, 4, 37), (9, 8, 19), (5, 3, 130)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,c", SHAPES)
def test_read_forward_and_backward_equal_batched_matmuls(m, n, c, dtype):
    x, read = _rand(m, n, c, dtype=dtype, seed=0), _rand(m, n + 1, n, dtype=dtype, seed=1)
    g_in, g_mix = _rand(m, c, dtype=dtype, seed=2), _rand(m, n, c, dtype=dtype, seed=3)
    y_in, y_mix = native.read_forward(x, read)
    y = torch.bmm(read, x)
    torch.testing.assert_close(y_in, y[:, 0], **_tol(dtype))
    torch.testing.assert_close(y_mix, y[:, 1:], **_tol(dtype))
    grad_y = torch.cat([g_in.unsqueeze(1), g_mix], dim=1)
    grad_x, grad_read = native.read_backward(x, read, g_in, g_mix, True, True)
    torch.testing.assert_close(grad_x, torch.bmm(read.transpose(1, 2), grad_y), **_tol(dtype))
    torch.testing.assert_close(grad_read, torch.bmm(grad_y, x.transpose(1, 2)), **_tol(dtype))
    only_x, none = native.read_backward(x, read, g_in, g_mix, True, False)
    assert none is None and torch.equal(only_x, grad_x)
    none, only_read = native.read_backward(x, read, g_in, g_mix, False, True)
    assert none is None and torch.equal(only_read, grad_read)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,c", SHAPES)
def test_write_backward_equals_the_contractions(m, n, c, dtype):
    grad, layer_out, h_post = _rand(m, n, c, dtype=dtype, seed=4), _rand(m, c, dtype=dtype, seed=5), _rand(m, n, dtype=dtype, seed=6)
    grad_post, grad_out = native.write_backward(grad, layer_out, h_post, True, True)
    torch.testing.assert_close(grad_post, (grad * layer_out.unsqueeze(1)).sum(-1), **_tol(dtype))
    torch.testing.assert_close(grad_out, (grad * h_post.unsqueeze(-1)).sum(1), **_tol(dtype))
    assert native.write_backward(grad, layer_out, h_post, False, False) == (None, None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 63, 64, 65, 200])  # partial and whole token blocks
@pytest.mark.parametrize("n", [1, 2, 4, 8])
@pytest.mark.parametrize("iters", [1, 2, 20])
def test_sinkhorn_equals_the_log_domain_loop(m, n, iters, dtype):
    logits = (_rand(m, n, n, dtype=torch.float64, seed=m + n) * 3).requires_grad_()
    plain = torch.exp(sinkhorn_log_iterations(logits, iters))
    grad_h = _rand(m, n, n, dtype=torch.float64, seed=12)
    (expected,) = torch.autograd.grad(plain, logits, grad_h)
    z = logits.detach().to(dtype)
    torch.testing.assert_close(native.sinkhorn_forward(z, iters), plain.to(dtype), **_tol(dtype))
    torch.testing.assert_close(native.sinkhorn_backward(z, grad_h.to(dtype), iters), expected.to(dtype), **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", native.VMATH)
def test_vector_math_equals_torch_to_a_few_ulp(name, dtype):
    """vmath.h's exp, log, tanh and sigmoid (vectorisable, used by every kernel) against
    torch's in float64, over their whole range: within 4 ulp of T, NaN and infinities alike."""
    gen = torch.Generator().manual_seed(7)
    big = 100.0 if dtype == torch.float32 else 720.0
    x = torch.cat([torch.empty(20000, dtype=torch.float64).uniform_(-big, big, generator=gen),
                   torch.empty(20000, dtype=torch.float64).uniform_(-2, 2, generator=gen),
                   torch.tensor([0.0, -0.0, 0.3, -0.3, 0.2999, 1e-20, -1e-30, 88.7, 89.0, 709.0, -103.9,
                                 -745.0, float("inf"), float("-inf"), float("nan")], dtype=torch.float64)])
    if name == "log":  # its domain in the kernels: positive normal numbers (Sinkhorn's sums)
        x = torch.cat([torch.empty(20000, dtype=torch.float64).uniform_(1, 8, generator=gen),
                       torch.logspace(-30, 30, 601, dtype=torch.float64), torch.tensor([1.0, 2.0, float("nan")], dtype=torch.float64)])
    x = x.to(dtype)
    reference = {"exp": torch.exp, "log": torch.log, "tanh": torch.tanh, "sigmoid": torch.sigmoid}[name]
    expected = reference(x.double())
    rounded = expected.to(dtype).double()  # what T can hold: overflow to inf, underflow to 0
    got = native.vmath(name, x).double()
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got.isinf(), rounded.isinf()) and torch.equal(got[got.isinf()], rounded[got.isinf()])
    ok = rounded.isfinite() & (rounded.abs() >= torch.finfo(dtype).tiny)  # no denormals
    ulp = torch.finfo(dtype).eps * expected[ok].abs()
    assert ((got[ok] - expected[ok]).abs() <= 4 * ulp).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_sinkhorn_stays_finite_for_extreme_logits(dtype):
    z = torch.tensor([[1e4, -1e4, 0.0, 5e3], [-1e4] * 4, [1e4] * 4, [0.0, 0.0, -3e3, 1e4]], dtype=dtype)
    z = torch.stack([z, -z, z.t()])  # (3, 4, 4)
    h = native.sinkhorn_forward(z, 20)
    grad = native.sinkhorn_backward(z, torch.ones_like(z), 20)
    assert torch.isfinite(h).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(h.sum(-1), torch.ones(3, 4, dtype=dtype))  # rows, after the row step


def test_results_do_not_depend_on_the_thread_count():
    """Each output element is computed by one thread in a fixed order: bit-identical."""
    x, read = _rand(300, 4, 96, dtype=torch.float32, seed=0), _rand(300, 5, 4, dtype=torch.float32, seed=1)
    g_in, g_mix = _rand(300, 96, dtype=torch.float32, seed=2), _rand(300, 4, 96, dtype=torch.float32, seed=3)
    z = _rand(300, 4, 4, dtype=torch.float32, seed=4)
    outputs = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outputs.append([*native.read_forward(x, read), *native.read_backward(x, read, g_in, g_mix, True, True),
                            native.sinkhorn_forward(z, 20), native.sinkhorn_backward(z, x[:, :, :4].contiguous(), 20)])
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*outputs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["hc", "mhc"])
def test_a_training_step_agrees_with_and_without_the_kernels(kind, monkeypatch):
    """Whole model, float32: loss and every gradient agree to float rounding."""
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    results = []
    for use in (True, False):
        if not use:
            monkeypatch.setattr(native, "usable", lambda *tensors, **kwargs: False)
        model = build_model(tiny_model_config(connection=kind, n_streams=4), 16, seed=0)
        _, loss, _ = model(idx, idx)
        loss.backward()
        results.append((loss.detach(), {name: p.grad for name, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-6)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grad, grads_b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_usable_only_for_contiguous_float_cpu_tensors():
    x = torch.zeros(4, 3, 8)
    assert native.usable(x, streams=3)
    assert not native.usable(x.transpose(1, 2))
    assert not native.usable(x.to(torch.bfloat16))
    assert not native.usable(x, x.double())
    assert not native.usable(x, streams=native.MAX_STREAMS + 1)


def test_build_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MHC_LAB_CACHE", str(tmp_path))
    first = native._build(native._compiler())
    assert first.parent == tmp_path and first.exists()
    stamp = first.stat().st_mtime_ns
    assert native._build(native._compiler()) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary left behind


def test_a_failed_build_falls_back_with_one_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MHC_LAB_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    native.reset()
    try:
        assert native.library() is None
        assert native.library() is None  # tried once
        assert not native.usable(torch.zeros(2, 2))
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "using torch ops" in err
    finally:
        native.reset()


def test_switched_off_by_environment():
    """MHC_LAB_NATIVE=0: nothing is built and the model runs on torch ops."""
    code = (
        "import torch\n"
        "from mhc_lab.nn import native\n"
        "from mhc_lab.nn.model import build_model\n"
        "from mhc_lab.experiment.config import ModelConfig\n"
        "m = build_model(ModelConfig(d_model=16, heads=2, depth=1, connection='mhc'), 8, 0)\n"
        "m(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))[1].backward()\n"
        "assert native.library() is None\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env={**_env(), "MHC_LAB_NATIVE": "0"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


def _env() -> dict:
    import os

    return dict(os.environ)


@pytest.mark.parametrize("kind", ["hc", "mhc"])
@pytest.mark.parametrize("n,c,tokens", [(8, 5, 70), (3, 17, 130), (4, 64, 64)])
def test_fused_connections_equal_the_torch_path(kind, n, c, tokens, monkeypatch):
    """HcRead / MhcRead against the unfused torch path, float64: several token blocks (the
    mHC kernels work in blocks of 64), odd widths, n up to the kernels' limit; values, H_res
    and the gradients of x and of every parameter."""
    from mhc_lab.nn.connections import HyperConnection, ManifoldHyperConnection

    gen = torch.Generator().manual_seed(n + c)
    conn = (HyperConnection(c, n, layer_index=2) if kind == "hc" else ManifoldHyperConnection(c, n, layer_index=2, sinkhorn_iters=7)).double()
    with torch.no_grad():
        for p in conn.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    sub = torch.nn.Linear(c, c).double()
    x = torch.randn(2, tokens // 2, n, c, generator=gen, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    results = []
    for use in (True, False):
        if not use:
            monkeypatch.setattr(native, "usable", lambda *tensors, **kwargs: False)
        out, h_res = conn(x, sub)
        inputs = [x, *conn.parameters(), *sub.parameters()]
        results.append((out, h_res, torch.autograd.grad((out * grad_out).sum() + h_res.square().sum(), inputs)))
    (out_a, h_a, g_a), (out_b, h_b, g_b) = results
    torch.testing.assert_close(out_a, out_b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h_a, h_b, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_a, g_b):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def _graph_nodes(root) -> list[str]:
    """Names of the autograd nodes reachable from `root`, AccumulateGrad excluded."""
    seen, stack, names = set(), [root], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ != "AccumulateGrad":
            names.append(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("kind", ["hc", "mhc"])
def test_a_fused_layer_is_two_autograd_nodes(kind):
    """The read (coefficients and parameter folding included) and the write: nothing else
    between the layer's input and output but the sublayer's own node."""
    from mhc_lab.nn.connections import HyperConnection, ManifoldHyperConnection

    conn = HyperConnection(8, 4, 1) if kind == "hc" else ManifoldHyperConnection(8, 4, 1)
    x = torch.randn(2, 3, 4, 8, requires_grad=True)
    out, h_res = conn(x, lambda z: z * 2.0)
    assert sorted(_graph_nodes(out.grad_fn)) == sorted([f"{'Hc' if kind == 'hc' else 'Mhc'}ReadBackward", "MulBackward0", "_StreamWriteBackward"])
    assert _graph_nodes(h_res.grad_fn) == [f"{'Hc' if kind == 'hc' else 'Mhc'}ReadBackward"]


@pytest.mark.parametrize("kind", ["hc", "mhc"])
def test_incoming_gradients_are_never_written(kind):
    """Hooks and retain_grad on every layer's output see the gradient autograd computed,
    unchanged after the whole backward (the kernels write only into their own buffers)."""
    from mhc_lab.nn.connections import HyperConnection, ManifoldHyperConnection

    make = (lambda k: HyperConnection(8, 4, k)) if kind == "hc" else (lambda k: ManifoldHyperConnection(8, 4, k))
    layers, sub = [make(k) for k in range(3)], torch.nn.Linear(8, 8)
    x = torch.randn(2, 3, 4, 8, requires_grad=True)
    seen, outs = [], []
    h = x
    for conn in layers:
        h, _ = conn(h, sub)
        h.retain_grad()
        h.register_hook(lambda g: seen.append((g, g.clone())))
        outs.append(h)
    (h.square().sum() + outs[0].sum()).backward()
    assert len(seen) == 3
    for out, (grad, copy) in zip(reversed(outs), seen):  # hooks run from the last layer back
        assert torch.equal(grad, copy) and torch.equal(out.grad, copy)


def test_fused_kernels_do_not_depend_on_the_thread_count():
    m, n, c = 300, 4, 40  # above the kernels' grain (32768 elements): two threads really run
    x = _rand(m, n, c, dtype=torch.float32, seed=0)
    g_in, g_mix, g_post = _rand(m, c, dtype=torch.float32, seed=1), _rand(m, n, c, dtype=torch.float32, seed=2), _rand(m, n, dtype=torch.float32, seed=3)
    weight_t, alpha, beta = _rand(n + 2, c, dtype=torch.float32, seed=4), _rand(n, n + 1, dtype=torch.float32, seed=5), _rand(n, dtype=torch.float32, seed=6)
    raw, bias = _rand(m, 2 * n + n * n, dtype=torch.float32, seed=7), _rand(2 * n + n * n, dtype=torch.float32, seed=8)
    outputs = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            hc = native.hc_forward(x, weight_t, alpha, beta, 0.3, 0.2, True, 1e-6)
            mhc = native.mhc_forward(x, raw, bias, 1e-6, 20)
            outputs.append([
                *hc, *native.hc_backward(x, weight_t, alpha, 0.3, 0.2, True, hc[4], hc[5], g_in, g_mix, g_post, None),
                *mhc, *native.mhc_backward(x, mhc[4], mhc[5], bias, 20, g_in, g_mix, g_post, None),
            ])
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*outputs):
        assert torch.equal(a, b)


def test_wrappers_refuse_mismatched_tensors():
    """A wrong dtype or layout would make the C code read or write out of bounds: refused."""
    x = torch.zeros(4, 2, 8)
    with pytest.raises(ValueError, match="one dtype"):
        native.read_forward(x, torch.zeros(4, 3, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="contiguous"):
        native.read_forward(x, torch.zeros(4, 2, 3).transpose(1, 2))


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: native.read_forward(torch.zeros(4, 9, 8), torch.zeros(4, 10, 9)), "1..8"),
        (lambda: native.read_forward(torch.zeros(4, 2, 8), torch.zeros(4, 2, 2)), "read has shape"),
        (lambda: native.sinkhorn_forward(torch.zeros(5, 4, 3), 20), "logits has shape"),
        (lambda: native.sinkhorn_forward(torch.zeros(5, 4, 4), 0), "iters"),
        (lambda: native.mhc_forward(torch.zeros(5, 4, 8), torch.zeros(5, 23), torch.zeros(24), 1e-6, 20), "raw has shape"),
        (lambda: native.hc_forward(torch.zeros(5, 4, 8), torch.zeros(6, 16), torch.zeros(4, 5), torch.zeros(4), 0.1, 0.1, True, 1e-6), "weight_t has shape"),
    ],
)
def test_wrappers_refuse_wrong_shapes(call, message):
    """Every operand's shape is checked against what the C code reads."""
    with pytest.raises(ValueError, match=message):
        call()


def test_non_square_logits_take_the_torch_path():
    from mhc_lab.nn.sinkhorn import sinkhorn_knopp

    z = _rand(50, 4, 3, dtype=torch.float32, seed=9)
    torch.testing.assert_close(sinkhorn_knopp(z, 20), torch.exp(sinkhorn_log_iterations(z, 20)))


def test_mhc_refuses_negative_sinkhorn_iterations():
    from mhc_lab.nn.connections import ManifoldHyperConnection

    with pytest.raises(ValueError, match="sinkhorn_iters"):
        ManifoldHyperConnection(8, 4, 0, sinkhorn_iters=-1)


@pytest.mark.parametrize("kind", ["hc", "mhc"])
def test_double_backward_raises_on_the_fused_paths(kind):
    """The kernels' backward builds no graph: create_graph must fail loudly, not return
    missing second-order terms."""
    from mhc_lab.nn.connections import HyperConnection, ManifoldHyperConnection

    conn = HyperConnection(8, 4, 1) if kind == "hc" else ManifoldHyperConnection(8, 4, 1)
    x = torch.randn(2, 3, 4, 8, requires_grad=True)
    out, _ = conn(x, torch.nn.Linear(8, 8))
    (grad,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()


def test_double_backward_of_the_mixing_functions_uses_the_torch_ops():
    """_StreamRead and _StreamWrite take the torch ops when the backward itself is
    differentiated (gradgradcheck); Sinkhorn-Knopp's analytic backward is first order only
    and says so."""
    from mhc_lab.nn.mixing import _StreamRead, _StreamWrite
    from mhc_lab.nn.sinkhorn import sinkhorn_knopp

    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)

    assert torch.autograd.gradgradcheck(lambda x, r: _StreamRead.apply(x, r), (rand(3, 2, 4), rand(3, 3, 2)))
    assert torch.autograd.gradgradcheck(lambda m, h, f: _StreamWrite.apply(m, h, f), (rand(3, 2, 4), rand(3, 2), rand(3, 4)))
    z = rand(2, 3, 3)
    (grad,) = torch.autograd.grad(sinkhorn_knopp(z, 3).square().sum(), z, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()

