"""Shared fixtures: tiny configs that build and train in well under a second on CPU."""

from __future__ import annotations

import pytest
import torch

from mhc_lab.nn import native
from mhc_lab.experiment.config import ModelConfig

torch.set_num_threads(1)


def tiny_model_config(**overrides) -> ModelConfig:
    """A 2-block model of width 16: fast enough for any unit test."""
    base = dict(d_model=16, heads=2, depth=2, mlp_ratio=2)
    base.update(overrides)
    return ModelConfig(**base)


@pytest.fixture
def tiny_config():
    return tiny_model_config


def require_native() -> None:
    """The fused CPU kernels must build and load wherever there is a C compiler (CI has one);
    only a machine without any compiler skips the tests that need them."""
    if native._compiler() is None:
        pytest.skip("no C compiler on this machine: the fused CPU kernels cannot be built")
    assert native.library() is not None, "the fused CPU kernels did not build or load (stderr says why)"


@pytest.fixture(params=["native", "torch"])
def kernel_path(request, monkeypatch):
    """Run a test twice: with the fused CPU kernels (mhc_lab/native) and with the torch ops."""
    if request.param == "native":
        require_native()
    else:
        monkeypatch.setattr(native, "usable", lambda *tensors, **kwargs: False)
    return request.param
