"""What a probe measures on the residual mixing: the mHC paper's gain (gain.py)."""

from .gain import gain_metrics, per_token_gains

__all__ = ["gain_metrics", "per_token_gains"]
