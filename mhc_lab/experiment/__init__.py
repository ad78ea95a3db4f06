"""The experiment file: loading, typed config, JSON Schema and sweep expansion.

    load_experiment(path, overrides) -> Experiment (config, planned runs with their ids)

Nothing here trains or writes; every problem is one `ConfigError` line naming the file and key.
"""

from .config import ExperimentConfig, ModelConfig, RunConfig
from .loader import ConfigError, Experiment, load_experiment
from .sweep import PlannedRun, make_run_id

__all__ = [
    "ConfigError", "Experiment", "ExperimentConfig", "ModelConfig", "PlannedRun", "RunConfig",
    "load_experiment", "make_run_id",
]
