"""The residual paths between layers: plain residual, HC and mHC (its exact variants: variants.py).

Legend: B = batch, T = tokens, n = residual streams (expansion rate), C = d_model.

All three share one interface, so the model never branches on the variant: the hidden state
is always a tensor x of shape (B, T, n, C) (n = 1 for the plain residual), and

    x_next, h_res = connection(x, sublayer)

implements the general update of both papers (DESIGN.md section 2):

    x_{l+1} = H_res_l @ x_l  +  H_post_l^T * F(H_pre_l @ x_l)

with every coefficient computed per token. `h_res` is (B, T, n, n), or None for the plain
residual (whose H_res is the constant 1x1 identity).

Speed (see BENCHMARKS.md): the modules here hold the parameters and the equations; the
per-token mixing runs through the custom autograd Functions of `mixing.py` (one read of the
streams for H_pre x and H_res x, the coefficients from one skinny matmul with the norm weight
folded in and 1/rms applied after it), and on CPU through `fused.py`, which computes the
coefficients and the read in one native pass. tests/test_connections_fast.py checks every
path against a plain transcription of the equations, values and gradients.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .fused import HcRead, MhcRead, fused_path_ok, hc_fold
from .mixing import Sublayer, _StreamWrite, mix_read, mix_streams, rms_projection
from .sinkhorn import iterations_needed, sinkhorn_knopp


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension, with a learnable weight."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class ResidualConnection(nn.Module):
    """Plain pre-norm residual: x + F(x) (n = 1, H_res = H_pre = H_post = 1)."""

    def forward(self, x: torch.Tensor, sublayer: Sublayer) -> tuple[torch.Tensor, None]:
        return x + sublayer(x.squeeze(-2)).unsqueeze(-2), None  # (B, T, 1, C)


class HyperConnection(nn.Module):
    """Hyper-Connections (Zhu et al., arXiv 2409.19606), dynamic variant by default.

    Per token, with Hbar = RMSNorm(x) applied to each stream row (DESIGN.md section 2, HC):

        H_post^T = s_beta  * tanh(Hbar @ W_beta) + B       (W_beta: C x 1, B: 1 x n)
        H_pre^T  = s_alpha * tanh(Hbar @ W_m)    + A_m     (W_m: C x 1,    A_m: n x 1)
        H_res^T  = s_alpha * tanh(Hbar @ W_r)    + A_r     (W_r: C x n,    A_r: n x n)

    Initialisation for layer k: W_* = 0, B = 1, A_m = e_(k mod n), A_r = I,
    s_alpha = s_beta = 0.01, so HC at step 0 equals the pre-norm residual model. Static HC
    (`dynamic=False`) keeps only B, A_m, A_r; `use_tanh=False` drops the tanh. Nothing bounds
    H_res. The paper's norm is LayerNorm; we use RMSNorm, as the rest of the model does.
    Parameter names: `static_*` are B, A_m, A_r (no weight decay), `dynamic_*` the W's.
    """

    def __init__(
        self,
        d_model: int,
        n_streams: int,
        layer_index: int,
        dynamic: bool = True,
        use_tanh: bool = True,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        n = n_streams
        self.dynamic = dynamic
        self.use_tanh = use_tanh
        a_m = torch.zeros(n, 1)
        a_m[layer_index % n, 0] = 1.0
        # A = [A_m | A_r]: row i holds stream i's read weight and its row of H_res^T.
        self.static_alpha = nn.Parameter(torch.cat([a_m, torch.eye(n)], dim=1))  # (n, 1 + n)
        self.static_beta = nn.Parameter(torch.ones(n))  # B: (n,)
        if dynamic:
            self.norm = RMSNorm(d_model, eps)
            self.dynamic_alpha = nn.Parameter(torch.zeros(d_model, 1 + n))  # [W_m | W_r]
            self.dynamic_beta = nn.Parameter(torch.zeros(d_model))  # W_beta
            self.gate_alpha = nn.Parameter(torch.tensor(0.01))  # s_alpha
            self.gate_beta = nn.Parameter(torch.tensor(0.01))  # s_beta

    def alpha_beta(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A = [H_pre^T | H_res^T] (B, T, n, 1 + n) and H_post^T (B, T, n) for x: (B, T, n, C).

        RMSNorm's weight and 1/rms are applied around one matmul with [W_m | W_r | W_beta]
        (x @ (w * W) / rms(x) = RMSNorm(x) @ W), so the normalised Hbar is never stored.
        """
        alpha = self.static_alpha  # (n, 1 + n)
        beta = self.static_beta  # (n,)
        if not self.dynamic:
            alpha = alpha.expand(*x.shape[:2], *alpha.shape)  # (B, T, n, 1 + n)
            return alpha, beta.expand(*x.shape[:3])  # (B, T, n)
        _, weights = hc_fold(self.norm.weight, self.dynamic_alpha, self.dynamic_beta)  # (C, n + 2)
        proj = rms_projection(x, weights, self.norm.eps)  # (B, T, n, 2 + n): Hbar @ W
        if self.use_tanh:
            proj = torch.tanh(proj)
        alpha = torch.addcmul(alpha, self.gate_alpha, proj[..., :-1])  # s_alpha * tanh(.) + A
        beta = torch.addcmul(beta, self.gate_beta, proj[..., -1])  # s_beta * tanh(.) + B
        return alpha, beta

    def coefficients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """H_pre (B, T, n), H_post (B, T, n), H_res (B, T, n, n) for x: (B, T, n, C)."""
        alpha, beta = self.alpha_beta(x)
        h_pre = alpha[..., 0]  # (B, T, n): H_pre^T
        h_res = alpha[..., 1:].transpose(-1, -2)  # (B, T, n, n): (H_res^T)^T
        return h_pre, beta, h_res

    def forward(self, x: torch.Tensor, sublayer: Sublayer) -> tuple[torch.Tensor, torch.Tensor]:
        if self.dynamic and fused_path_ok(x, self.static_alpha):
            return self._fused_forward(x, sublayer)
        if self.dynamic and ops.compiled_path_ok(x, self.static_alpha):
            return self._compiled_forward(x, sublayer)
        alpha, beta = self.alpha_beta(x)
        read = alpha.transpose(-1, -2)  # (B, T, 1 + n, n): A^T = [H_pre; H_res]
        return mix_read(x, read, beta, sublayer), read[..., 1:, :]

    def _fused_forward(self, x: torch.Tensor, sublayer: Sublayer) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` as two autograd nodes: the coefficients and the read in one native pass
        (`fused.HcRead`), then the write into its own H_res x buffer."""
        layer_in, mixed, h_post, h_res = HcRead.apply(
            x, self.norm.weight, self.dynamic_alpha, self.dynamic_beta, self.static_alpha, self.static_beta,
            self.gate_alpha, self.gate_beta, self.use_tanh, self.norm.eps,
        )  # (B, T, C), (B, T, n, C), (B, T, n), (B, T, n, n)
        return _StreamWrite.apply(mixed, h_post, sublayer(layer_in), True), h_res

    def _compiled_forward(self, x: torch.Tensor, sublayer: Sublayer) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` under torch.compile: the same kernel as a custom op (`ops.hc_read`); the
        folding and the write are traced torch ops, which Inductor fuses."""
        _, weights = hc_fold(self.norm.weight, self.dynamic_alpha, self.dynamic_beta)  # (C, n + 2)
        layer_in, mixed, h_post, h_res, _, _ = ops.hc_read(
            x.contiguous(), weights.t().contiguous(), self.static_alpha, self.static_beta, self.gate_alpha,
            self.gate_beta, self.use_tanh, self.norm.eps,
        )
        return torch.addcmul(mixed, h_post.unsqueeze(-1), sublayer(layer_in).unsqueeze(-2)), h_res


class ManifoldHyperConnection(nn.Module):
    """Manifold-Constrained Hyper-Connections (DeepSeek, arXiv 2512.24880).

    Per token, with v = vec(x_l) of length nC (DESIGN.md section 2, mHC):

        v'    = RMSNorm(v)
        Hpre~ = a_pre * (v' @ phi_pre) + b_pre,   H_pre  = sigmoid(Hpre~)
        Hpost~= a_post* (v' @ phi_post)+ b_post,  H_post = 2 * sigmoid(Hpost~)
        Hres~ = a_res * mat(v' @ phi_res) + b_res, H_res = SinkhornKnopp(Hres~)

    As in the paper's kernels, phi_pre | phi_post | phi_res are one (nC x (2n + n*n)) matrix,
    the RMSNorm weight (and here the gates a_*) are folded into it and 1/rms(v) is applied
    after the matmul, so RMSNorm(v) is never stored (`rms_projection`). Gates start
    at 0.01 and phi at 0 (the paper does not say; zero makes the start input-independent, as
    in HC). Bias initialisation (the paper does not give one), strength s = `init_logit`:
    b_res = -s off the diagonal, 0 on it, so H_res starts near the identity (diagonal
    e^s / (e^s + n - 1): 0.711 for the default s = 2, n = 4); b_pre = +s for stream k mod n,
    -s elsewhere; b_post = 0. A larger s starts nearer the identity, but its tiny off-diagonal
    entries make Sinkhorn-Knopp converge slowly (a nearly decomposable matrix): with s = 4,
    20 iterations leave column errors about 1000x larger once training perturbs the logits
    (tests/test_model.py), which the composite backward gain multiplies over depth.
    """

    def __init__(
        self,
        d_model: int,
        n_streams: int,
        layer_index: int,
        sinkhorn_iters: int = 20,
        init_logit: float = 2.0,
        eps: float = 1e-6,
        sinkhorn_tol: Optional[float] = None,
    ) -> None:
        super().__init__()
        if sinkhorn_iters < 0:
            raise ValueError(f"sinkhorn_iters must be >= 0, got {sinkhorn_iters}")
        n = n_streams
        self.n = n
        self.sinkhorn_iters = sinkhorn_iters
        self.sinkhorn_tol = sinkhorn_tol
        self.eps = eps
        self.norm_weight = nn.Parameter(torch.ones(n * d_model))  # RMSNorm weight over nC
        self.dynamic_phi = nn.Parameter(torch.zeros(n * d_model, 2 * n + self.res_logits))
        self.gate_pre = nn.Parameter(torch.tensor(0.01))
        self.gate_post = nn.Parameter(torch.tensor(0.01))
        self.gate_res = nn.Parameter(torch.tensor(0.01))
        b_pre = torch.full((n,), -init_logit)
        b_pre[layer_index % n] = init_logit
        self.bias_pre = nn.Parameter(b_pre)
        self.bias_post = nn.Parameter(torch.zeros(n))
        self.bias_res = nn.Parameter(self.initial_res_bias(init_logit))

    # -- how H_res is built from its per-token logits: the part the mHC variants replace --------

    @property
    def fused_sinkhorn(self) -> bool:
        """Whether `forward` may take the fused native path (`fused.MhcRead`, or `ops.mhc_read`
        under torch.compile), which builds H_res by t_max Sinkhorn-Knopp iterations itself and
        folds phi and the biases as `_folded` does: only where that is this connection's H_res,
        i.e. `residual_matrix` and `_folded` are not overridden and no tolerance is set. A
        subclass with its own construction therefore never takes it, on any device."""
        cls = type(self)
        return (cls.residual_matrix is ManifoldHyperConnection.residual_matrix
                and cls._folded is ManifoldHyperConnection._folded and self.sinkhorn_tol is None)

    @property
    def res_logits(self) -> int:
        """How many logits per token H_res is built from: n*n for Sinkhorn-Knopp."""
        return self.n * self.n

    def initial_res_bias(self, init_logit: float) -> torch.Tensor:
        """b_res: -s off the diagonal, 0 on it ((n, n), flattened in `_folded`)."""
        return -init_logit * (1.0 - torch.eye(self.n))

    def residual_matrix(self, logits: torch.Tensor) -> torch.Tensor:
        """H_res (..., n, n) from the logits (..., res_logits): Sinkhorn-Knopp of mat(logits),
        t_max iterations, or with `sinkhorn_tol` until every column sum is within tol (at most
        t_max; `sinkhorn.sinkhorn_knopp`)."""
        return sinkhorn_knopp(logits.unflatten(-1, (self.n, self.n)), self.sinkhorn_iters, self.sinkhorn_tol)

    # -- the shared mHC parametrisation -----------------------------------------------------------

    def _folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """phi with the RMSNorm weight and the gates a_* folded in, (nC, 2n + K), and the
        biases [b_pre | b_post | vec(b_res)], (2n + K,); K = `res_logits` (n*n for mHC)."""
        n = self.n
        gates = torch.cat(
            [self.gate_pre.expand(n), self.gate_post.expand(n), self.gate_res.expand(self.res_logits)]
        )  # (2n + K,): a_pre, a_post, a_res per column
        bias = torch.cat([self.bias_pre, self.bias_post, self.bias_res.flatten()])  # (2n + K,)
        phi = self.norm_weight.unsqueeze(-1) * self.dynamic_phi * gates  # (nC, 2n + K)
        return phi, bias

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """a * (RMSNorm(vec(x)) @ phi) + b for x: (B, T, n, C): (B, T, 2n + K), with 1/rms
        applied after the matmul; the last K are H_res's logits."""
        phi, bias = self._folded()
        return rms_projection(x.flatten(-2), phi, self.eps) + bias  # (B, T, 2n + K)

    def residual_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The logits H_res is built from, (B, T, K), for x: (B, T, n, C) (probe diagnostics)."""
        return self.logits(x)[..., 2 * self.n :]

    @torch.no_grad()
    def diagnose(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-token diagnostics of the constraint for x: (B, T, n, C), over the B*T tokens:
        `logit_spread` (max - min of H_res's logits) and, with `sinkhorn_tol`, the iterations
        each token needs for every column sum to be within tol (`sinkhorn_iters`, at most
        t_max) and whether it got there (`sinkhorn_converged`)."""
        logits = self.residual_logits(x).flatten(0, -2)  # (M, K)
        if logits.shape[-1] == 0:  # n = 1: H_res is the constant 1
            return {"logit_spread": logits.new_zeros(logits.shape[0])}
        out = {"logit_spread": logits.amax(-1) - logits.amin(-1)}
        if self.sinkhorn_tol is not None and self.sinkhorn_iters > 0:
            square = logits.unflatten(-1, (self.n, self.n))
            out["sinkhorn_iters"], out["sinkhorn_converged"] = iterations_needed(
                square, self.sinkhorn_tol, self.sinkhorn_iters
            )
        return out

    def coefficients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """H_pre (B, T, n), H_post (B, T, n), H_res (B, T, n, n) for x: (B, T, n, C)."""
        n = self.n
        logits = self.logits(x)  # (B, T, 2n + K)
        gated = torch.sigmoid(logits[..., : 2 * n])  # (B, T, 2n)
        h_pre = gated[..., :n]  # (B, T, n)
        h_post = 2.0 * gated[..., n:]  # (B, T, n)
        h_res = self.residual_matrix(logits[..., 2 * n :])  # (B, T, n, n)
        return h_pre, h_post, h_res

    def forward(self, x: torch.Tensor, sublayer: Sublayer) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fused_sinkhorn and fused_path_ok(x, self.dynamic_phi):
            return self._fused_forward(x, sublayer)
        if self.fused_sinkhorn and ops.compiled_path_ok(x, self.dynamic_phi):
            return self._compiled_forward(x, sublayer)
        h_pre, h_post, h_res = self.coefficients(x)
        return mix_streams(x, h_pre, h_post, h_res, sublayer), h_res

    def _fused_forward(self, x: torch.Tensor, sublayer: Sublayer) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` as two autograd nodes: the folding, the coefficients and the read in one
        (`fused.MhcRead`, which folds as `_folded` does), then the write into its own H_res x
        buffer."""
        layer_in, mixed, h_post, h_res = MhcRead.apply(
            x, self.norm_weight, self.dynamic_phi, self.gate_pre, self.gate_post, self.gate_res,
            self.bias_pre, self.bias_post, self.bias_res, self.sinkhorn_iters, self.eps,
        )  # (B, T, C), (B, T, n, C), (B, T, n), (B, T, n, n)
        return _StreamWrite.apply(mixed, h_post, sublayer(layer_in), True), h_res

    def _compiled_forward(self, x: torch.Tensor, sublayer: Sublayer) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` under torch.compile: the same kernel as a custom op (`ops.mhc_read`); the
        folding (`_folded`), the projection matmul and the write are traced torch ops."""
        phi, bias = self._folded()
        x = x.contiguous()
        raw = x.flatten(-2) @ phi  # (B, T, K): vec(x) @ phi, the norm applied in the kernel
        layer_in, mixed, h_post, h_res, _, _ = ops.mhc_read(x, raw, bias, self.eps, self.sinkhorn_iters)
        return torch.addcmul(mixed, h_post.unsqueeze(-1), sublayer(layer_in).unsqueeze(-2)), h_res


def is_decayed(name: str, param: nn.Parameter) -> bool:
    """Weight decay goes to weight matrices and the dynamic HC/mHC weights (HC's W_beta is a
    vector, but dynamic), never to static HC/mHC parts, biases, gates or norms (HC paper: the
    static parts get no weight decay, the dynamic ones do)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf.startswith(("static_", "bias_")):
        return False
    return param.ndim >= 2 or leaf.startswith("dynamic_")


def optional_hres(h_res: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """H_res of a layer as (B, T, n, n); the plain residual's is the 1x1 identity."""
    if h_res is not None:
        return h_res
    return torch.ones(*x.shape[:2], 1, 1, dtype=x.dtype, device=x.device)
