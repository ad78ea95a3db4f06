"""Live logging of a run to W&B and TensorBoard (the experiment's `logging` section).

    require_installed(settings)      before anything is written: every enabled backend's
                                     package is there, else one line naming the key
    open_logger(settings, ...)       the run's logger: a LoggerSet of the enabled backends
                                     (the no-op base when none is)

base.py holds the interface and what is logged; one file per backend (wandb_logger.py,
tensorboard_logger.py). Adding a backend (MLflow, ...) is one file with one MetricLogger
subclass, its key in experiment/config.py's LoggingConfig, and its branch here.
"""

from __future__ import annotations

import importlib.util
from ...experiment.config import LoggingConfig
from ...experiment.loader import ConfigError
from ...store import RunFiles, read_jsonl
from .base import LoggerSet, MetricLogger, RunInfo

__all__ = ["LoggerSet", "MetricLogger", "RunInfo", "open_logger", "require_installed"]

# backend key -> (the module it needs, the extra that installs it)
PACKAGES = {"wandb": ("wandb", "wandb"), "tensorboard": ("tensorboard", "tensorboard")}


def enabled(settings: LoggingConfig) -> list[str]:
    """The keys of the enabled backends, e.g. ['wandb', 'tensorboard']."""
    return [key for key, on in (("wandb", settings.wandb is not None), ("tensorboard", settings.tensorboard)) if on]


def require_installed(settings: LoggingConfig) -> None:
    """ConfigError (one line: the key and the install command) if an enabled backend's package
    is missing. Looks the package up without importing it."""
    for key in enabled(settings):
        module, extra = PACKAGES[key]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"logging.{key}: the {module} package is not installed; install it with "
                f"pip install -e \".[{extra}]\" (or pip install {module}), or turn logging.{key} off"
            )


def _last_step(path) -> int:
    steps = [r.get("step", -1) for r in read_jsonl(path)]
    return max(steps, default=-1)


def open_logger(
    settings: LoggingConfig, experiment: str, run_id: str, config: dict, connection: str, files: RunFiles
) -> MetricLogger:
    """The logger of one run about to train into `files` (call it before the trainer loads the
    checkpoint: what the logs already hold tells a resumed backend which steps it has)."""
    keys = enabled(settings)
    if not keys:
        return MetricLogger()
    resuming = files.checkpoint.exists()
    info = RunInfo(
        run_id=run_id, experiment=experiment, root=files.root, config=config, connection=connection,
        logged_step=_last_step(files.metrics) if resuming else -1,
        logged_probe=_last_step(files.probes) if resuming else -1,
        resuming=resuming,
    )
    backends: list[MetricLogger] = []
    if "wandb" in keys:
        from .wandb_logger import WandbLogger

        backends.append(WandbLogger(settings.wandb, info))
    if "tensorboard" in keys:
        from .tensorboard_logger import TensorBoardLogger

        backends.append(TensorBoardLogger(info))
    return LoggerSet(backends, run_id)

