"""Shared fixtures: tiny configs that build and train in well under a second on CPU."""

from __future__ import annotations

import pytest
import torch

from mhc_lab.config import ModelConfig

torch.set_num_threads(1)


def tiny_model_config(**overrides) -> ModelConfig:
    """A 2-block model of width 16: fast enough for any unit test."""
    base = dict(d_model=16, heads=2, depth=2, mlp_ratio=2)
    base.update(overrides)
    return ModelConfig(**base)


@pytest.fixture
def tiny_config():
    return tiny_model_config
