"""Weights & Biases: one W&B run per mhc-lab run (`logging.wandb`; `pip install -e ".[wandb]"`).

- name = the run id; group = the experiment's name; tags = the connection plus
  `logging.wandb.tags`; config = the resolved run config (config.yaml);
- id = the run id plus 8 hex digits drawn when the run starts from step 0, kept in
  `<run>/wandb/mhc-lab-id.txt`: a run resumed from its checkpoint continues the same W&B run
  (wandb's resume by id), while `--fresh`, a restart from scratch or the same run id in
  another results folder starts a new one;
- files under `<run>/wandb/` (offline mode: upload later with `wandb sync <run>/wandb/offline-run-*`);
- step = the run's own step. A resumed run retrains the steps after its checkpoint to the same
  numbers; the ones W&B already has (up to the last line metrics.jsonl / probes.jsonl held
  before the resume) are not sent again, so W&B sees every step once, in order;
- at the end, the W&B summary gets the summary row's values (summary.json, without the
  environment).

W&B's own terminal output is turned off (`console="off"`, `silent=True`): mhc-lab's progress
display stays as it is.
"""

from __future__ import annotations

import secrets
from typing import Optional

from ...experiment.config import WandbConfig
from ...store import atomic_write_text
from .base import MetricLogger, RunInfo, layer_scalars, probe_scalars, step_scalars, summary_values

ID_FILE = "mhc-lab-id.txt"


def wandb_id(info: RunInfo) -> str:
    """The W&B run id: kept from the run's previous session when it resumes, else new."""
    path = info.root / "wandb" / ID_FILE
    if info.resuming and path.exists():
        kept = path.read_text(encoding="utf-8").strip()
        if kept:
            return kept
    new = f"{info.run_id}-{secrets.token_hex(4)}"
    atomic_write_text(path, new + "\n")
    return new


class WandbLogger(MetricLogger):
    """Mirrors a run's metrics, probes and summary into one W&B run (module docstring)."""

    label = "W&B"

    def __init__(self, settings: WandbConfig, info: RunInfo) -> None:
        self.settings = settings
        self.info = info
        self.run = None

    def start(self, step: int) -> None:
        import wandb

        info, s = self.info, self.settings
        self.run = wandb.init(
            project=s.project,
            entity=s.entity,
            mode=s.mode,
            id=wandb_id(info),
            name=info.run_id,
            group=info.experiment,
            tags=list(dict.fromkeys([info.connection, *s.tags])),
            config={**info.config, "run_id": info.run_id, "experiment": info.experiment},
            dir=str(info.root),
            resume="allow",
            reinit="create_new",
            settings=wandb.Settings(console="off", silent=True, save_code=False),
        )

    def log_step(self, record: dict) -> None:
        if record["step"] > self.info.logged_step:
            self.run.log(step_scalars(record), step=record["step"])

    def log_probe(self, record: dict) -> None:
        if record["step"] > self.info.logged_probe:
            self.run.log({**probe_scalars(record), **layer_scalars(record)}, step=record["step"])

    def finish(self, summary: Optional[dict]) -> None:
        if self.run is None:
            return
        run, self.run = self.run, None
        if summary is not None:
            run.summary.update(summary_values(summary))
        failed = summary is None or summary.get("status") == "failed"
        run.finish(exit_code=1 if failed else 0)
