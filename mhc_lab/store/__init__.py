"""The results store: the on-disk format `run` writes and `plot`, `report`, `ls` read
(files.py), and the integrity record and check of finished runs (integrity.py)."""

from .files import (
    FINISHED, IN_USE, SUMMARY_COLUMNS, DamagedResults, ExperimentStore, JsonlWriter, RunFiles, StoreError,
    as_float, atomic_write_bytes, atomic_write_text, blocking_lock, exclusive_lock, is_locked,
    list_experiments, open_results, peak_gain, read_jsonl, to_json, truncate_jsonl, unwritable,
)
from .integrity import RunCheck, check_run, check_store, move_aside, record

__all__ = [
    "FINISHED", "IN_USE", "SUMMARY_COLUMNS", "DamagedResults", "ExperimentStore", "JsonlWriter", "RunCheck",
    "RunFiles", "StoreError", "as_float", "atomic_write_bytes", "atomic_write_text", "blocking_lock",
    "check_run", "check_store", "exclusive_lock", "is_locked", "list_experiments", "move_aside",
    "open_results", "peak_gain", "read_jsonl", "record", "to_json", "truncate_jsonl", "unwritable",
]
