"""Byte-level decoder-only transformer whose residual path is pluggable (residual, HC, mHC).

Legend: B = batch, T = tokens, n = residual streams, C = d_model, V = 256 (bytes),
L = layers (2 per block: attention, then MLP), H = heads, D = C / H.

Reads top to bottom: the connection of each layer, attention, MLP, pre-norm sublayer, the model. The token embedding is
copied into all n streams, every layer goes through its connection, the streams are summed,
then the final RMSNorm and the (tied) unembedding (DESIGN.md section 2). Last, the gradient
norm that the trainer logs and `mhc-lab bench` times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..experiment.config import ModelConfig
from .connections import (
    HyperConnection, ManifoldHyperConnection, ResidualConnection, RMSNorm, is_decayed, optional_hres,
)
from .variants import KromhcConnection, MhcLiteConnection, OrthostochasticConnection

VOCAB_SIZE = 256
# The mHC variants with an exact doubly-stochastic H_res (variants.py), by `model.connection`.
VARIANTS: dict[str, type[ManifoldHyperConnection]] = {
    "mhc_lite": MhcLiteConnection, "kromhc": KromhcConnection, "ortho": OrthostochasticConnection,
}


def build_connection(cfg: ModelConfig, layer_index: int) -> nn.Module:
    """The connection of layer `layer_index` (0-based, counting sublayers) for this config:
    `residual`, `hc`, `mhc`, or an exact mHC variant (`mhc_lite`, `kromhc`, `ortho`,
    variants.py)."""
    if cfg.connection == "residual":
        return ResidualConnection()
    if cfg.connection == "hc":
        return HyperConnection(
            cfg.d_model, cfg.n_streams, layer_index, cfg.hc_dynamic, cfg.hc_tanh, cfg.norm_eps
        )
    if cfg.connection == "mhc":
        return ManifoldHyperConnection(
            cfg.d_model,
            cfg.n_streams,
            layer_index,
            cfg.sinkhorn_iters,
            cfg.mhc_init_logit,
            cfg.norm_eps,
            cfg.sinkhorn_tol,
        )
    if cfg.connection in VARIANTS:
        return VARIANTS[cfg.connection](cfg.d_model, cfg.n_streams, layer_index, cfg.mhc_init_logit, cfg.norm_eps)
    raise ValueError(f"unknown connection {cfg.connection!r}")


@dataclass
class ProbeCapture:
    """What one probe pass collects (`LanguageModel.probe`)."""

    hres: torch.Tensor  # (L, T, n, n): every layer's H_res for every probe token
    stream_rms: torch.Tensor  # (L + 1,) float64: RMS of the state entering each layer, and the output
    diagnostics: list[Optional[dict[str, torch.Tensor]]]  # per layer: per-token constraint diagnostics


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention (no biases)."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=-1)  # 3 x (B, T, C)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))  # (B, T, C)


class MLP(nn.Module):
    """Two-layer GELU MLP."""

    def __init__(self, d_model: int, ratio: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, ratio * d_model, bias=False)
        self.proj = nn.Linear(ratio * d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class PreNormSublayer(nn.Module):
    """F(x) = f(RMSNorm(x)): the pre-norm sits inside the sublayer, as in both papers."""

    def __init__(self, d_model: int, inner: nn.Module, eps: float) -> None:
        super().__init__()
        self.norm = RMSNorm(d_model, eps)
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.norm(x))


class LanguageModel(nn.Module):
    """The model: embed, L = 2 * depth sublayers each behind a connection, sum, norm, unembed."""

    def __init__(self, cfg: ModelConfig, max_seq_len: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_streams = cfg.n_streams
        self.token_embedding = nn.Embedding(VOCAB_SIZE, cfg.d_model)
        self.position_embedding = nn.Embedding(max_seq_len, cfg.d_model)
        sublayers: list[nn.Module] = []
        for _ in range(cfg.depth):
            sublayers.append(PreNormSublayer(cfg.d_model, CausalSelfAttention(cfg.d_model, cfg.heads), cfg.norm_eps))
            sublayers.append(PreNormSublayer(cfg.d_model, MLP(cfg.d_model, cfg.mlp_ratio), cfg.norm_eps))
        self.sublayers = nn.ModuleList(sublayers)
        self.connections = nn.ModuleList(build_connection(cfg, k) for k in range(cfg.layers))
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2 style: N(0, 0.02) for matrices, output projections scaled by 1/sqrt(L).

        Connection parameters keep the initialisation their class gives them.
        """
        for module in [self.token_embedding, self.position_embedding, *self.sublayers]:
            for name, p in module.named_parameters():
                if p.ndim >= 2:
                    std = 0.02 / math.sqrt(self.cfg.layers) if name.endswith("proj.weight") else 0.02
                    nn.init.normal_(p, mean=0.0, std=std)

    def forward(
        self,
        idx: torch.Tensor,
        targets: Optional[torch.Tensor] = None,
        return_hres: bool = False,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """idx: (B, T) bytes. Returns logits (B, T, V), the mean cross-entropy loss against
        `targets` (or None) and, if `return_hres`, every layer's H_res for every token as
        (L, B*T, n, n) (else None; capturing costs nothing when not asked)."""
        b, t = idx.shape
        x = self._embed(idx)  # (B, T, n, C)
        captured: list[torch.Tensor] = []
        for sublayer, connection in zip(self.sublayers, self.connections):
            x, h_res = connection(x, sublayer)
            if return_hres:
                captured.append(optional_hres(h_res, x).reshape(b * t, self.n_streams, self.n_streams))
        logits = self._unembed(self.final_norm(x.sum(dim=-2)))  # (B, T, V): streams summed
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        hres = torch.stack(captured) if return_hres else None  # (L, B*T, n, n)
        return logits, loss, hres

    def _embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Token plus position embedding, copied into every stream: (B, T) -> (B, T, n, C)."""
        b, t = idx.shape
        pos = torch.arange(t, device=idx.device)
        h = self.token_embedding(idx) + self.position_embedding(pos)  # (B, T, C)
        return h.unsqueeze(-2).expand(b, t, self.n_streams, h.shape[-1])  # views of one copy

    @torch.no_grad()
    def probe(self, idx: torch.Tensor) -> "ProbeCapture":
        """One pass for the gain probe over idx (B, T): every layer's H_res for every token,
        (L, B*T, n, n) as in `forward`; the RMS of the hidden state x_l (over tokens, streams
        and channels) entering each layer l = 0..L-1 and leaving the last one, (L + 1,)
        float64; and each mHC-family layer's per-token diagnostics of its constraint
        (`ManifoldHyperConnection.diagnose`; None for residual and HC layers). The RMS is the
        residual signal itself, which the gain metric bounds through H_res alone: with HC it
        can grow by orders of magnitude while every sublayer's output stays O(1). Squares are
        summed in float64, so the RMS of any finite float32 state is finite."""
        b, t = idx.shape
        x = self._embed(idx)
        captured, rms, diagnostics = [], [_rms64(x)], []
        for sublayer, connection in zip(self.sublayers, self.connections):
            diagnose = getattr(connection, "diagnose", None)
            diagnostics.append(diagnose(x) if diagnose is not None else None)
            x, h_res = connection(x, sublayer)
            captured.append(optional_hres(h_res, x).reshape(b * t, self.n_streams, self.n_streams))
            rms.append(_rms64(x))
        return ProbeCapture(torch.stack(captured), torch.stack(rms).cpu(), diagnostics)

    def stream_rms(self, idx: torch.Tensor) -> torch.Tensor:
        """The RMS of the hidden state entering each layer and leaving the last (see `probe`)."""
        return self.probe(idx).stream_rms

    def _unembed(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.token_embedding.weight.t()  # tied weights: (B, T, V)

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay for weight matrices, none for static/bias/gate/norm parameters."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            (decay if is_decayed(name, p) else no_decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _rms64(x: torch.Tensor) -> torch.Tensor:
    """Root mean square of all entries, accumulated in float64 (no overflow of the squares)."""
    return torch.linalg.vector_norm(x, dtype=torch.float64) / math.sqrt(x.numel())


def build_model(cfg: ModelConfig, max_seq_len: int, seed: int) -> LanguageModel:
    """A model with deterministic initialisation from `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LanguageModel(cfg, max_seq_len)


def gradient_norm(parameters: Iterable[nn.Parameter], max_norm: Optional[float]) -> float:
    """The global L2 norm of the gradients before clipping, and the clip to `max_norm` if set.

    `clip_grad_norm_` is exactly `get_total_norm` then `clip_grads_with_norm_`; without a clip
    the second would multiply every gradient by 1.0, a pass over each of HC's and mHC's
    900-1000 parameter tensors at the headline (7-8 per layer) that changes no finite gradient,
    so it is left out (a non-finite norm ends the run before any update). The trainer logs it
    every step and `mhc-lab bench` times it in its step."""
    params = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm.item()
