"""Integrity of finished runs: what a run wrote, recorded in its summary.json, and the check
every reader makes against it (`mhc-lab check`, and `run`, `ls`, `plot`, `report`).

When a run finishes, `record(files)` stores, for each file it wrote (config.yaml,
metrics.jsonl, probes.jsonl, hres.npz, error.txt), its size in bytes, its number of lines and
its sha256, under `integrity` in summary.json. `check_run` compares the files with that record:
a truncated metrics.jsonl shows as fewer lines than recorded, a file changed in place as
another sha256. summary.json itself is checked by parsing it (it cannot hold its own hash).

Runs written before mhc-lab recorded this (no `integrity` key, e.g. most committed results)
cannot be checked that way: for them `check_run` only verifies that every file parses, and
calls them `unchecked`, never damaged for lacking a record. Damaged runs are moved aside to
`<experiment>/damaged/`, never deleted (`move_aside`), and `run` then trains them again.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from .files import DamagedResults, ExperimentStore, RunFiles, StoreError

RECORDED = ("config.yaml", "metrics.jsonl", "probes.jsonl", "hres.npz", "error.txt")
VERSION = 1
FINE, UNCHECKED, DAMAGED, UNFINISHED = "fine", "unchecked", "damaged", "unfinished"


TEXT = (".jsonl", ".yaml", ".txt")  # files whose line count is recorded


def file_record(path: Path) -> dict[str, Any]:
    """Size, line count (text files) and sha256 of one file."""
    digest, size, lines = hashlib.sha256(), 0, 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
            size += len(chunk)
            lines += chunk.count(b"\n")
    entry: dict[str, Any] = {"bytes": size, "lines": lines} if path.name.endswith(TEXT) else {"bytes": size}
    return {**entry, "sha256": digest.hexdigest()}


def record(files: RunFiles) -> dict[str, Any]:
    """The integrity record of a run's files as they are now (taken when the run finishes)."""
    present = [files.root / name for name in RECORDED if (files.root / name).exists()]
    return {"version": VERSION, "files": {p.name: file_record(p) for p in present}}


@dataclass(frozen=True)
class RunCheck:
    """The outcome of checking one run folder.

    state: `fine` (matches its record), `unchecked` (no record; its files parse), `damaged`
    (`problem` names the file and what is wrong) or `unfinished` (no summary.json yet)."""

    run_id: str
    root: Path
    state: str
    problem: str = ""

    @property
    def damaged(self) -> bool:
        return self.state == DAMAGED

    def line(self) -> str:
        """One line for the terminal: `<problem>` for a damaged run, else `<run>: <state>`."""
        return self.problem if self.damaged else f"{self.root}: {self.state}"


def check_run(files: RunFiles, thorough: bool = True) -> RunCheck:
    """Check a run's files against the record in its summary.json.

    `thorough=False` (for `ls`) compares only presence and sizes and parses nothing but
    summary.json; the default also compares sha256 and, for runs without a record, parses
    every file."""
    def result(state: str, problem: str = "") -> RunCheck:
        return RunCheck(files.run_id, files.root, state, problem)

    try:
        summary = files.read_summary()
    except DamagedResults as exc:
        return result(DAMAGED, str(exc))
    if summary is None:
        return result(UNFINISHED)
    recorded = summary.get("integrity")
    if recorded is None:
        problem = _parse_problem(files) if thorough else None
        return result(DAMAGED, problem) if problem else result(UNCHECKED)
    problem = _record_problem(files, recorded, thorough)
    return result(DAMAGED, problem) if problem else result(FINE)


def _record_problem(files: RunFiles, recorded: Any, thorough: bool) -> Optional[str]:
    entries = recorded.get("files") if isinstance(recorded, dict) else None
    if not isinstance(entries, dict):
        return f"{files.summary}: damaged, its `integrity` record is malformed"
    for name, want in sorted(entries.items()):
        if name not in RECORDED or not isinstance(want, dict):
            return f"{files.summary}: damaged, its `integrity` record names {name!r}"
        path = files.root / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return f"{path}: missing (the run wrote {want.get('bytes')} bytes)"
        if size == want.get("bytes") and not thorough:
            continue
        try:
            got = file_record(path)
        except OSError as exc:
            return f"{path}: cannot be read ({exc.strerror})"
        if got["bytes"] != want.get("bytes") and name.endswith(TEXT) and got["lines"] != want.get("lines"):
            how = "truncated" if got["lines"] < want.get("lines", 0) else "grown"
            return f"{path}: {got['lines']} lines, {want.get('lines')} when the run finished ({how})"
        if got["bytes"] != want.get("bytes"):
            return f"{path}: {got['bytes']} bytes, {want.get('bytes')} when the run finished (changed)"
        if got["sha256"] != want.get("sha256"):
            return f"{path}: changed since the run finished (sha256 differs)"
    return None


def _parse_problem(files: RunFiles) -> Optional[str]:
    """For runs without a record: the first file that does not parse, or None."""
    for path in (files.metrics, files.probes):
        if not path.exists():
            continue
        number = 0
        try:
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    json.loads(line)
        except (OSError, ValueError) as exc:  # a torn last line too: the run had finished
            return f"{path}: damaged at line {max(number, 1)} ({_short(exc)})"
    if files.hres.exists():
        try:
            files.load_hres()
        except StoreError as exc:
            return str(exc)
    if files.config.exists():
        try:
            yaml.safe_load(files.config.read_text(encoding="utf-8"))
        except (OSError, ValueError, yaml.YAMLError) as exc:
            return f"{files.config}: damaged ({_short(exc)})"
    return None


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def check_store(store: ExperimentStore, run_ids: Optional[list[str]] = None, thorough: bool = True) -> list[RunCheck]:
    """check_run for every run folder of an experiment (or those of `run_ids` that exist)."""
    present = store.run_ids()
    ids = present if run_ids is None else [rid for rid in run_ids if rid in set(present)]
    return [check_run(store.run(rid), thorough) for rid in ids]


def move_aside(store: ExperimentStore, run_id: str) -> Path:
    """Move a run folder to `<experiment>/damaged/<run_id>.<time>` (never deleted); returns
    where it went. The run is then pending: `mhc-lab run` trains it again."""
    store.damaged_dir.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = store.damaged_dir / f"{run_id}.{stamp}"
    n = 1
    while target.exists():
        n += 1
        target = store.damaged_dir / f"{run_id}.{stamp}-{n}"
    os.replace(store.run(run_id).root, target)
    return target
