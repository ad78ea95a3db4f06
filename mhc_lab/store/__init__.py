"""The results store: the on-disk format `run` writes and `plot`, `report`, `ls` read (files.py)."""

from .files import (
    FINISHED, SUMMARY_COLUMNS, ExperimentStore, JsonlWriter, RunFiles, StoreError, as_float,
    atomic_write_bytes, atomic_write_text, blocking_lock, exclusive_lock, list_experiments,
    open_results, peak_gain, read_jsonl, to_json, truncate_jsonl,
)

__all__ = [
    "FINISHED", "SUMMARY_COLUMNS", "ExperimentStore", "JsonlWriter", "RunFiles", "StoreError",
    "as_float", "atomic_write_bytes", "atomic_write_text", "blocking_lock", "exclusive_lock",
    "list_experiments", "open_results", "peak_gain", "read_jsonl", "to_json", "truncate_jsonl",
]
