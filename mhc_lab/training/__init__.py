"""One training run (corpus, schedule, AdamW loop, probes, checkpoints) and the runner that
plans a sweep against its store and trains one run into it."""

from .runner import execute_run, plan_sweep, run_status
from .trainer import Trainer, train_run

__all__ = ["Trainer", "execute_run", "plan_sweep", "run_status", "train_run"]
