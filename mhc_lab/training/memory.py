"""How much memory a run needs at least, against what the machine has: refused up front.

`estimate(cfg)` is a lower bound of the memory training a run holds at once, in bytes, float32:

- weights, gradients and AdamW's two moments: 4 x 4 bytes per parameter (the parameters are
  counted on torch's `meta` device: nothing is allocated);
- the activations backward keeps: every layer's input streams, B x T x n x C floats (the
  mixing H_res x, or the residual's pre-norm, needs them), and the logits with their gradient,
  2 x B x T x 256.

Attention, MLP and norm intermediates come on top, so a run that exceeds the machine's memory
by this estimate cannot train; one within it may still not fit. `machine_memory(device)`: the
physical memory (or a smaller cgroup limit) for CPU, the device's memory for CUDA, the
recommended working set for MPS; None where it cannot be known.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..experiment.config import ModelConfig, RunConfig
from ..nn.model import VOCAB_SIZE, build_model

FLOAT_BYTES = 4
OPTIMIZER_COPIES = 4  # weights, gradients, AdamW exp_avg and exp_avg_sq


@dataclass(frozen=True)
class Estimate:
    """A run's memory lower bound, in bytes, and its two parts."""

    weights: int  # parameters, gradients, optimiser state
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.activations


def parameter_count(model: ModelConfig, seq_len: int) -> int:
    """The model's parameter count, built on the meta device (no memory, no initialisation)."""
    return _parameter_count(model.model_dump_json(), seq_len)


@functools.lru_cache(maxsize=64)
def _parameter_count(model_json: str, seq_len: int) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(ModelConfig.model_validate_json(model_json), seq_len, 0).parameters())


def estimate(cfg: RunConfig) -> Estimate:
    """The lower bound of the module docstring for one run (one process)."""
    m, t = cfg.model, cfg.train
    n = 1 if m.connection == "residual" else m.n_streams
    tokens = t.batch_size * t.seq_len
    weights = OPTIMIZER_COPIES * FLOAT_BYTES * parameter_count(m, t.seq_len)
    activations = FLOAT_BYTES * tokens * (m.layers * n * m.d_model + 2 * VOCAB_SIZE)
    return Estimate(weights, activations)


def machine_memory(device: torch.device) -> Optional[int]:
    """Bytes of memory a run on `device` can use at most, or None if unknown."""
    if device.type in ("cuda", "mps"):
        try:
            if device.type == "cuda":
                return torch.cuda.get_device_properties(device.index or 0).total_memory
            return int(torch.mps.recommended_max_memory())
        except (RuntimeError, AssertionError, AttributeError):  # no such device here: the run says so
            return None
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    return min(physical, _cgroup_limit() or physical)


def _cgroup_limit() -> Optional[int]:
    """A container's memory limit (cgroup v2, then v1), if one is set."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # v1 writes a huge number for "no limit"
            return int(text)
    return None


def fmt_bytes(n: float) -> str:
    """1.2 GiB, 340 MiB, 12 KiB."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def memory_problem(runs: Sequence[tuple[str, RunConfig]], device: torch.device, at_once: int = 1,
                   available: Optional[int] = None) -> Optional[str]:
    """One line if a run, or the `at_once` largest runs together (--workers), need more memory
    than `available` (default: the machine's for `device`); else None."""
    available = machine_memory(device) if available is None else available
    if available is None or not runs:
        return None
    try:
        sized = sorted(((estimate(cfg), rid) for rid, cfg in runs), key=lambda e: -e[0].total)
    except Exception:  # noqa: BLE001 - a model that cannot be built on `meta`: the run will say why
        return None
    largest, run_id = sized[0]
    where = f"than this machine has for {device.type} ({fmt_bytes(available)})"
    if largest.total > available:
        return (f"{run_id}: needs at least {fmt_bytes(largest.total)} of memory to train (weights, "
                f"gradients and AdamW state {fmt_bytes(largest.weights)}, activations "
                f"{fmt_bytes(largest.activations)}), more {where}; reduce train.batch_size, "
                "train.seq_len or the model")
    together = sum(e.total for e, _ in sized[:at_once])
    if at_once > 1 and together > available:
        return (f"--workers {at_once}: the {min(at_once, len(sized))} largest runs need at least "
                f"{fmt_bytes(together)} of memory at once, more {where}; use fewer workers")
    return None
