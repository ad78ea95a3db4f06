"""mHC variants whose H_res is exactly doubly stochastic for any logits (2026 follow-ups).

Legend: ... = batch dims (B, T), n = residual streams, K = H_res logits per token.

Finite Sinkhorn-Knopp (mHC, t_max = 20) leaves the columns of H_res only approximately
normalised, and on near-permutation logits a single layer's column sum can stay near 2
(docs/results.md). Each variant here keeps everything of `ManifoldHyperConnection` (the RMS
projection of the flattened streams, H_pre = sigmoid, H_post = 2 sigmoid, the gates a_* and
the weight-decay rules) and replaces only how H_res is built from its per-token logits
l = a_res * (RMSNorm(vec x) @ phi_res) + b_res:

- `MhcLiteConnection` (mHC-lite, Yang & Gao, arXiv 2601.05732): Birkhoff-von Neumann,
  H_res = sum_k a_k P_k over all n! permutation matrices, a = softmax(l), K = n!.
- `KromhcConnection` (KromHC, arXiv 2601.21579): H_res = U_1 kron ... kron U_K for n = 2^K,
  U_k = [[a_k, 1 - a_k], [1 - a_k, a_k]], a_k = sigmoid(l_k): (A kron B) 1 = A1 kron B1 = 1,
  the same for columns. The reference code writes each U_k as softmax over its two
  permutations (identity, swap) with two logits; a_k = sigmoid(l_0 - l_1) is the same
  family, so one logit per factor suffices. K = log2 n.
- `OrthostochasticConnection`: H_res = Q * Q (entrywise) with Q orthogonal, from the Cayley
  transform Q = (I - A)(I + A)^-1 of the skew-symmetric A whose upper triangle holds l,
  K = n(n - 1) / 2. Every row and column of an orthogonal Q has unit 2-norm, so H_res is
  doubly stochastic up to float rounding. Why Cayley: one n x n solve per token, exact for
  any logits (I + A is always invertible for skew A), where the Newton-Schulz
  orthogonalisation of "Orthostochastic Residual Mixing for mHC" (2026) is iterative and
  approximate like Sinkhorn, and a matrix exponential costs more; Cayley cannot reach an
  orthogonal Q with eigenvalue -1, but Q * Q only needs Q up to the signs of its entries,
  and every permutation matrix is reached (a swap is Q * Q of a 90-degree rotation).

Initialisation. Every variant starts, like `mhc` with strength s = `mhc_init_logit`, from an
H_res with diagonal d = e^s / (e^s + n - 1) (0.711 for s = 2, n = 4), so that a comparison
isolates the construction and not the starting point:

- mhc_lite: bias g on the identity permutation and 0 on the others, g chosen so that the
  diagonal is d; the initial H_res then equals mHC's exactly (d on the diagonal,
  (1 - d) / (n - 1) off it). With the reference code's bias (0 on the identity, -8 on the
  rest) the identity weight is 0.992; we start where mHC starts instead.
- kromhc: every factor starts at a = d^(1/K), so diag(H_res) = d; the off-diagonal entries
  are products a^i (1 - a)^(K - i), not uniform.
- ortho: A = c S, with S a skew conference matrix (S S^T = (n - 1) I; Paley's construction,
  n = 2, 4, 8), gives H_res = d on the diagonal and (1 - d) / (n - 1) off it, exactly mHC's.
  For other n, S is the tournament sign matrix (+1 above the diagonal, -1 below) and c
  gives a mean diagonal d. A = 0 would give H_res = I, where the gradient of Q * Q with
  respect to A vanishes (off-diagonal Q_ij enter squared): c != 0 starts away from it.
"""

from __future__ import annotations

import itertools
import math

import torch

from ..experiment.config import MAX_LITE_STREAMS  # mhc_lite: n! logits per token
from .connections import ManifoldHyperConnection


def initial_diagonal(init_logit: float, n: int) -> float:
    """mHC's initial H_res diagonal e^s / (e^s + n - 1), the target of every variant's bias."""
    return math.exp(init_logit) / (math.exp(init_logit) + n - 1)


class MhcLiteConnection(ManifoldHyperConnection):
    """mHC-lite: H_res = sum over the n! permutations P_k of softmax(l)_k P_k (exact)."""

    def __init__(self, d_model: int, n_streams: int, layer_index: int, init_logit: float = 2.0,
                 eps: float = 1e-6) -> None:
        if n_streams > MAX_LITE_STREAMS:
            raise ValueError(f"mhc_lite needs n! logits per token: n_streams must be <= "
                             f"{MAX_LITE_STREAMS}, got {n_streams}")
        perms = list(itertools.permutations(range(n_streams)))  # perms[0] is the identity
        self._n_perms = len(perms)
        super().__init__(d_model, n_streams, layer_index, sinkhorn_iters=0, init_logit=init_logit, eps=eps)
        eye = torch.eye(n_streams)
        self.register_buffer("permutations", eye[torch.tensor(perms)], persistent=False)  # (n!, n, n)

    @property
    def res_logits(self) -> int:
        return self._n_perms

    def initial_res_bias(self, init_logit: float) -> torch.Tensor:
        """g on the identity permutation, 0 elsewhere, with diag(H_res) = d (module docstring):
        H = a I + (1 - a)(n! J / n - I) / (n! - 1) for identity weight a, so
        d = a + (1 - a) r with r = ((n-1)! - 1) / (n! - 1)."""
        n, count = self.n, self._n_perms
        bias = torch.zeros(count)
        if count > 1:
            d = initial_diagonal(init_logit, n)
            r = (math.factorial(n - 1) - 1) / (count - 1)
            a = (d - r) / (1 - r)
            bias[0] = math.log(a * (count - 1) / (1 - a))
        return bias

    def residual_matrix(self, logits: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(logits, dim=-1)  # (..., n!)
        perms = self.permutations.to(weights.dtype)
        return torch.einsum("...k,kij->...ij", weights, perms)  # (..., n, n)


class KromhcConnection(ManifoldHyperConnection):
    """KromHC: H_res = kron of K = log2(n) factors [[a, 1 - a], [1 - a, a]], a = sigmoid(l)."""

    def __init__(self, d_model: int, n_streams: int, layer_index: int, init_logit: float = 2.0,
                 eps: float = 1e-6) -> None:
        if n_streams & (n_streams - 1):
            raise ValueError(f"kromhc needs n_streams a power of 2, got {n_streams}")
        self._factors = n_streams.bit_length() - 1
        super().__init__(d_model, n_streams, layer_index, sinkhorn_iters=0, init_logit=init_logit, eps=eps)

    @property
    def res_logits(self) -> int:
        return self._factors

    def initial_res_bias(self, init_logit: float) -> torch.Tensor:
        """Every factor at a = d^(1/K): diag(H_res) = a^K = d."""
        if self._factors == 0:
            return torch.zeros(0)
        a = initial_diagonal(init_logit, self.n) ** (1.0 / self._factors)
        return torch.full((self._factors,), math.log(a / (1.0 - a)))

    def residual_matrix(self, logits: torch.Tensor) -> torch.Tensor:
        a = torch.sigmoid(logits)  # (..., K)
        batch = logits.shape[:-1]
        h = torch.ones(*batch, 1, 1, dtype=a.dtype, device=a.device)
        for k in range(self._factors):
            ak, bk = a[..., k, None, None], 1.0 - a[..., k, None, None]  # (..., 1, 1)
            factor = torch.cat([torch.cat([ak, bk], -1), torch.cat([bk, ak], -1)], -2)  # (..., 2, 2)
            # (A kron U)[2i + p, 2j + q] = A[i, j] U[p, q]
            h = (h[..., :, None, :, None] * factor[..., None, :, None, :]).reshape(
                *batch, 2 * h.shape[-2], 2 * h.shape[-1])
        return h  # (..., n, n)


def skew_conference_matrix(n: int) -> torch.Tensor:
    """A skew-symmetric S with S S^T = (n - 1) I (Paley: n = q + 1, q prime, q = 3 mod 4; and
    n = 2), or, for other n, the tournament sign matrix (+1 above the diagonal, -1 below)."""
    q = n - 1
    if n == 2 or (q > 2 and q % 4 == 3 and all(q % p for p in range(2, int(q ** 0.5) + 1))):
        squares = {(x * x) % q for x in range(1, q)}
        chi = [0] + [1 if x in squares else -1 for x in range(1, q)]  # quadratic character
        s = torch.zeros(n, n)
        s[0, 1:], s[1:, 0] = 1.0, -1.0
        s[1:, 1:] = torch.tensor([[float(chi[(j - i) % q]) for j in range(q)] for i in range(q)])
        return s
    return torch.ones(n, n).triu(1) - torch.ones(n, n).tril(-1)


def cayley_orthostochastic(a: torch.Tensor) -> torch.Tensor:
    """Q * Q for Q = (I - A)(I + A)^-1 = (I + A)^-1 (I - A) (the two factors commute), for
    skew-symmetric A (..., n, n). The solve runs in float64 (n x n per token: cheap), so Q is
    orthogonal to float64 rounding even for logits of 1e4; the result has A's dtype."""
    a64 = a.double()
    eye = torch.eye(a.shape[-1], dtype=torch.float64, device=a.device)
    q = torch.linalg.solve(eye + a64, eye - a64)  # (..., n, n)
    return (q * q).to(a.dtype)


class OrthostochasticConnection(ManifoldHyperConnection):
    """H_res = Q * Q, Q the Cayley transform of the skew-symmetric matrix of the logits."""

    def __init__(self, d_model: int, n_streams: int, layer_index: int, init_logit: float = 2.0,
                 eps: float = 1e-6) -> None:
        rows, cols = torch.triu_indices(n_streams, n_streams, offset=1)
        self._upper = (rows, cols)
        super().__init__(d_model, n_streams, layer_index, sinkhorn_iters=0, init_logit=init_logit, eps=eps)

    @property
    def res_logits(self) -> int:
        return self.n * (self.n - 1) // 2

    def skew(self, logits: torch.Tensor) -> torch.Tensor:
        """The skew-symmetric A (..., n, n) whose upper triangle (row-major) is `logits`."""
        n = self.n
        a = logits.new_zeros(*logits.shape[:-1], n, n)
        rows, cols = self._upper
        a[..., rows, cols] = logits
        return a - a.transpose(-1, -2)

    def initial_res_bias(self, init_logit: float) -> torch.Tensor:
        """c S (upper triangle) with diag(H_res) = d: for a skew conference S,
        Q = ((1 - m c^2) I - 2 c S) / (1 + m c^2) with m = n - 1, so sqrt(d) = (1 - m c^2) /
        (1 + m c^2); otherwise c by bisection on the mean diagonal."""
        n = self.n
        if n == 1:
            return torch.zeros(0)
        s = skew_conference_matrix(n).double()
        d = initial_diagonal(init_logit, n)
        m = n - 1
        if torch.allclose(s @ s.T, m * torch.eye(n, dtype=s.dtype)):
            c = math.sqrt((1 - math.sqrt(d)) / ((1 + math.sqrt(d)) * m))
        else:
            lo, hi = 0.0, 1.0
            for _ in range(60):  # the mean diagonal falls from 1 as c grows from 0
                c = (lo + hi) / 2
                diag = cayley_orthostochastic(c * s).diagonal().mean().item()
                lo, hi = (c, hi) if diag > d else (lo, c)
        rows, cols = self._upper
        return (c * s[rows, cols]).float()

    def residual_matrix(self, logits: torch.Tensor) -> torch.Tensor:
        return cayley_orthostochastic(self.skew(logits))  # (..., n, n)
