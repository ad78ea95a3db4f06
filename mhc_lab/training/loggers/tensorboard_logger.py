"""TensorBoard: event files under `<run>/tb/` (`logging.tensorboard`; `pip install -e ".[tensorboard]"`).

The same scalars as every backend (base.py), at the run's own step; the per-layer composite
gain is the layer-indexed family gain_fwd_by_layer/<layer>, gain_bwd_by_layer/<layer>.
`tensorboard --logdir results/<name>` shows a sweep, one run per `runs/<run_id>/tb`.

Resume: the writer opens with `purge_step` = the step the run restarts from (0 when it starts
afresh), so TensorBoard hides whatever an earlier session logged from that step on and the
retrained steps appear once, in order. Events are flushed at every probe and at the end.
"""

from __future__ import annotations

from typing import Optional

from .base import MetricLogger, RunInfo, layer_scalars, probe_scalars, step_scalars, summary_values

FLUSH_S = 10


class TensorBoardLogger(MetricLogger):
    """Writes a run's metrics and probes as TensorBoard scalars (module docstring)."""

    label = "TensorBoard"

    def __init__(self, info: RunInfo) -> None:
        self.info = info
        self.writer = None

    @property
    def log_dir(self):
        return self.info.root / "tb"

    def start(self, step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=step, flush_secs=FLUSH_S)

    def _scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)

    def log_step(self, record: dict) -> None:
        self._scalars(step_scalars(record), record["step"])

    def log_probe(self, record: dict) -> None:
        self._scalars({**probe_scalars(record), **layer_scalars(record)}, record["step"])
        self.writer.flush()

    def finish(self, summary: Optional[dict]) -> None:
        if self.writer is None:
            return
        writer, self.writer = self.writer, None
        if summary is not None:
            rows = "\n".join(f"| {k} | {v} |" for k, v in summary_values(summary).items())
            writer.add_text("summary", "| key | value |\n|---|---|\n" + rows, global_step=summary.get("steps_done") or 0)
        writer.close()
