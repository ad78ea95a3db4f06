"""Sweep expansion: one base config plus grid cells and points -> resolved run configs.

Override keys are dotted paths into a run config (`model.depth`, `train.lr`, `seed`).
A run's id is stable for its resolved config: a readable prefix plus a hash of every field
that can change the run (fields a connection ignores are left out, so e.g. a residual run
swept over `model.n_streams` is one run, not four).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

from .config import IRRELEVANT_MODEL_FIELDS, LATER_FIELDS, ExperimentConfig, RunConfig


@dataclass(frozen=True)
class PlannedRun:
    """One point of the sweep: its id, resolved config and the overrides that made it."""

    run_id: str
    config: RunConfig
    overrides: dict[str, Any] = field(default_factory=dict)


def set_dotted(target: dict, key: str, value: Any) -> None:
    """Set `target[a][b] = value` for key `a.b`, creating no new sections."""
    *parents, leaf = key.split(".")
    node = target
    for part in parents:
        if not isinstance(node.get(part), dict):
            raise KeyError(key)
        node = node[part]
    node[leaf] = value


def canonical_dict(cfg: RunConfig) -> dict[str, Any]:
    """The config fields that can change a run's numbers (what run_id hashes)."""
    data = cfg.model_dump(mode="json")
    for name in IRRELEVANT_MODEL_FIELDS[cfg.model.connection]:
        data["model"].pop(name, None)
    data["probe"].pop("checkpoint", None)
    for key, default in LATER_FIELDS.items():  # at its default a later field changes nothing
        section, name = key.split(".")
        if data[section].get(name, default) == default:
            data[section].pop(name, None)
    return data


def make_run_id(cfg: RunConfig) -> str:
    """E.g. `hc-L48-C64-n4-s0-1a2b3c4d`: connection, layers, width, streams, seed, hash."""
    m = cfg.model
    digest = hashlib.sha1(
        json.dumps(canonical_dict(cfg), sort_keys=True).encode()
    ).hexdigest()[:8]
    return f"{m.connection}-L{m.layers}-C{m.d_model}-n{m.n_streams}-s{cfg.seed}-{digest}"


def override_sets(exp: ExperimentConfig) -> list[dict[str, Any]]:
    """Every combination of a grid cell and a point (a point's keys win over the grid's)."""
    keys = list(exp.sweep.grid)
    cells = [dict(zip(keys, values)) for values in itertools.product(*exp.sweep.grid.values())]
    points = exp.sweep.points or [{}]
    return [{**cell, **point} for point in points for cell in cells]


def expand(exp: ExperimentConfig) -> list[PlannedRun]:
    """Resolved, validated runs of an experiment in sweep order, duplicates removed.

    Raises KeyError (unknown dotted key) or pydantic.ValidationError (bad value); the
    experiment-file loader turns both into one-line messages.
    """
    base = exp.base_run()
    runs: list[PlannedRun] = []
    seen: set[str] = set()
    for overrides in override_sets(exp):
        data = copy.deepcopy(base)
        for key, value in overrides.items():
            set_dotted(data, key, value)
        cfg = RunConfig.model_validate(data)
        run_id = make_run_id(cfg)
        if run_id not in seen:
            seen.add(run_id)
            runs.append(PlannedRun(run_id, cfg, overrides))
    return runs
