"""Learning-rate schedules: linear warmup, then cosine, the mHC paper's step decay, or constant."""

from __future__ import annotations

import math

from ..experiment.config import TrainConfig


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Learning rate for optimiser step `step` (0-based)."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "step":
        # mHC paper: x0.316 at 80% and x0.1 at 90% of the steps.
        if step >= 0.9 * cfg.steps:
            return cfg.lr * 0.1
        if step >= 0.8 * cfg.steps:
            return cfg.lr * 0.316
        return cfg.lr
    span = max(cfg.steps - cfg.warmup, 1)
    progress = min(max(step - cfg.warmup, 0) / span, 1.0)
    floor = cfg.min_lr_ratio * cfg.lr
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))
