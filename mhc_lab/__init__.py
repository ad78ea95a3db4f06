"""mhc-lab: see residual-stream instability of Hyper-Connections, and mHC's fix, on your own machine.

The stable names for library use (imported on first use, so `import mhc_lab` stays light):

    from mhc_lab import HyperConnection, ManifoldHyperConnection   # the connection modules
    from mhc_lab import build_model, gain_metrics, load_view        # model, gain metric, results

- connections: `ResidualConnection`, `HyperConnection`, `ManifoldHyperConnection` and its
  exact variants `MhcLiteConnection`, `KromhcConnection`, `OrthostochasticConnection`;
  `build_connection(model_config, layer_index)`, `sinkhorn_knopp(logits, iters, tol)`;
- the model: `build_model(model_config, max_seq_len, seed)`, `ModelConfig`;
- the gain metric: `gain_metrics(hres)` and `per_token_gains(hres)` for H_res of shape
  (layers, tokens, n, n);
- experiments and results: `load_experiment(path)`, `load_view(results_folder)` (the runs of a
  results folder, as the plots and reports read them).

docs/architecture.md says which module holds what.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC: dict[str, str] = {
    "ResidualConnection": "mhc_lab.nn.connections",
    "HyperConnection": "mhc_lab.nn.connections",
    "ManifoldHyperConnection": "mhc_lab.nn.connections",
    "MhcLiteConnection": "mhc_lab.nn.variants",
    "KromhcConnection": "mhc_lab.nn.variants",
    "OrthostochasticConnection": "mhc_lab.nn.variants",
    "build_connection": "mhc_lab.nn.model",
    "sinkhorn_knopp": "mhc_lab.nn.sinkhorn",
    "build_model": "mhc_lab.nn.model",
    "LanguageModel": "mhc_lab.nn.model",
    "ModelConfig": "mhc_lab.experiment.config",
    "gain_metrics": "mhc_lab.probe.gain",
    "per_token_gains": "mhc_lab.probe.gain",
    "load_experiment": "mhc_lab.experiment.loader",
    "load_view": "mhc_lab.analysis.view",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use (PEP 562)."""
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'mhc_lab' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
