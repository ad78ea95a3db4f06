"""Helpers for tests that go through the CLI and the results store."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from mhc_lab.cli import app

TINY_EXPERIMENT = {
    "name": "tiny",
    "seed": 0,
    "data": {"source": "stdlib", "max_bytes": 200_000},
    "model": {"d_model": 16, "heads": 2, "depth": 1, "mlp_ratio": 2, "n_streams": 2},
    "train": {"steps": 6, "batch_size": 2, "seq_len": 16, "lr": 3e-3, "warmup": 1, "threads": 1},
    "probe": {"every": 2, "val_batches": 1},
    "sweep": {"grid": {"model.connection": ["residual", "hc", "mhc"]}},
}

# Fields that measure time, not the computation; everything else must be reproducible.
TIMING_KEYS = {"tokens_per_s", "wall_s"}
# Fields derived from files that hold timing fields (the integrity record hashes metrics.jsonl).
DERIVED_KEYS = {"integrity"}


def write_experiment(folder: Path, overrides: dict | None = None, name: str = "exp.yaml") -> Path:
    """A tiny experiment file in `folder`, with top-level sections merged from `overrides`."""
    data = json.loads(json.dumps(TINY_EXPERIMENT))
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key].update(value)
        else:
            data[key] = value
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def cli(*args: str):
    """Invoke the CLI in-process; returns typer's Result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(app, [str(a) for a in args])


def strip_timing(obj):
    """A copy of a JSON-like object without timing fields (and those derived from them)."""
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if k not in TIMING_KEYS | DERIVED_KEYS}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


def run_contents(run_dir: Path) -> dict:
    """The reproducible content of a run folder: metrics, probes, summary, H_res arrays."""
    import numpy as np

    out = {
        "metrics": strip_timing([json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]),
        "probes": strip_timing([json.loads(l) for l in (run_dir / "probes.jsonl").read_text().splitlines()]),
        "summary": strip_timing(json.loads((run_dir / "summary.json").read_text())),
    }
    with np.load(run_dir / "hres.npz") as z:
        out["hres"] = {k: z[k].tolist() for k in z.files}
    return out


class InterruptAt:
    """A sweep reporter that raises KeyboardInterrupt (as Ctrl-C would) when a run reaches
    training step `step`: any run, or only the one with `run_id`, or only the `run_index`-th
    run started (0-based)."""

    def __init__(self, step: int, run_id: str | None = None, run_index: int | None = None) -> None:
        self.step, self.run_id, self.run_index, self.current = step, run_id, run_index, -1

    def sweep_started(self, runs, done): ...

    def run_started(self, run, index):
        self.current = index

    def run_event(self, run, event):
        if self.run_id is not None and run.run_id != self.run_id:
            return
        if self.run_index is not None and self.current != self.run_index:
            return
        if event["event"] == "step" and event["step"] == self.step:
            raise KeyboardInterrupt

    def run_finished(self, run, summary): ...
