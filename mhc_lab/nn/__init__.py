"""The model and its residual connections (plain residual, HC, mHC), with Sinkhorn-Knopp,
the per-token mixing Functions, and the fused native CPU kernels that speed them up.

    build_model(cfg, max_seq_len, seed) -> LanguageModel
    build_connection(cfg, layer_index)  -> ResidualConnection | HyperConnection | ManifoldHyperConnection
                                           or an exact variant: MhcLite-, Kromhc-, OrthostochasticConnection
"""

from .connections import HyperConnection, ManifoldHyperConnection, ResidualConnection
from .model import LanguageModel, build_connection, build_model
from .variants import KromhcConnection, MhcLiteConnection, OrthostochasticConnection
from .sinkhorn import sinkhorn_knopp

__all__ = [
    "HyperConnection", "KromhcConnection", "LanguageModel", "ManifoldHyperConnection",
    "MhcLiteConnection", "OrthostochasticConnection", "ResidualConnection", "build_connection",
    "build_model", "sinkhorn_knopp",
]
