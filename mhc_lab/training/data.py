"""The byte corpus: built-in (the Python standard library's own source) or user files.

Nothing is ever downloaded. The exact bytes used are fingerprinted (sha256), so two results
are known to share data. The split is deterministic: `tail` holds out the last `val_fraction`
of the bytes (files in sorted order: the alphabetically last files); `hashed` holds out whole
files whose path hashes below `val_fraction` (`hashed_validation`), so validation text is drawn
from the same mix of files as training text. The probe sequence is the first `seq_len + 1`
held-out bytes, the same every probe.
Training batches depend only on (seed, step), so a resumed run sees the same batches.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from ..experiment.config import DataConfig, user_files


@dataclass(frozen=True)
class Corpus:
    """Train and validation bytes (uint8 tensors) and where they came from."""

    train: torch.Tensor
    val: torch.Tensor
    fingerprint: str  # sha256 of all bytes used, before the split
    description: str
    n_files: int

    @property
    def n_bytes(self) -> int:
        return self.train.numel() + self.val.numel()


def stdlib_files() -> list[Path]:
    """The standard library's .py files (no site-packages, no caches), sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        p
        for p in root.rglob("*.py")
        if "site-packages" not in p.parts and "__pycache__" not in p.parts and p.is_file()
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def read_files(files: list[Path], max_bytes: int) -> list[bytes]:
    """Each file's bytes in order, stopping once `max_bytes` are read (the last one cut)."""
    chunks: list[bytes] = []
    total = 0
    for f in files:
        if total >= max_bytes:
            break
        data = f.read_bytes()[: max_bytes - total]
        chunks.append(data)
        total += len(data)
    return chunks


def read_bytes(files: list[Path], max_bytes: int) -> bytes:
    """Concatenate the files' bytes in order, stopping at `max_bytes`."""
    return b"".join(read_files(files, max_bytes))


def hashed_validation(name: str, val_fraction: float) -> bool:
    """Whether the file with this (relative, '/'-separated) name is held out by `hashed`:
    the first 8 bytes of sha256(name), as a fraction of 2^64, fall below val_fraction."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < val_fraction


def _names(files: list[Path], root: Optional[Path]) -> list[str]:
    """Stable names for the hash: paths relative to `root` (the stdlib), or to the files'
    common folder."""
    if not files:
        return []
    base = root or Path(os.path.commonpath([str(f.parent) for f in files]))
    return [f.relative_to(base).as_posix() for f in files]


@lru_cache(maxsize=4)
def _load(path: Optional[str], base_dir: Optional[str], max_bytes: int, val_fraction: float,
          val_split: str = "tail") -> Corpus:
    if path is None:
        files = stdlib_files()
        root: Optional[Path] = Path(sysconfig.get_paths()["stdlib"])
        description = f"Python {sysconfig.get_python_version()} standard library source"
    else:
        files = user_files(path, Path(base_dir) if base_dir else None)
        root = None
        description = f"files: {path}"
    chunks = read_files(files, max_bytes)
    raw = b"".join(chunks)
    if len(raw) < 10_000:
        raise ValueError(f"corpus has only {len(raw)} bytes; at least 10000 are needed")
    if val_split == "hashed":
        # names relative to the folder of *all* the files, so that max_bytes cannot move them
        held = [hashed_validation(name, val_fraction) for name in _names(files, root)][: len(chunks)]
        train_bytes = b"".join(c for c, h in zip(chunks, held) if not h)
        val_bytes = b"".join(c for c, h in zip(chunks, held) if h)
        if not val_bytes or not train_bytes:
            raise ValueError(
                f"data.val_split hashed: {len(chunks)} file(s) give no {'validation' if not val_bytes else 'training'} "
                "file; use more files or val_split tail"
            )
        train = torch.frombuffer(bytearray(train_bytes), dtype=torch.uint8)
        val = torch.frombuffer(bytearray(val_bytes), dtype=torch.uint8)
    else:
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        n_val = max(int(len(raw) * val_fraction), 1)
        train, val = data[:-n_val], data[-n_val:]
    return Corpus(
        train=train,
        val=val,
        fingerprint=hashlib.sha256(raw).hexdigest(),
        description=description,
        n_files=len(files),
    )


def load_corpus(cfg: DataConfig, base_dir: Optional[Path] = None) -> Corpus:
    """The corpus for a data config (cached per process)."""
    return _load(cfg.path, str(base_dir) if base_dir else None, cfg.max_bytes, cfg.val_fraction, cfg.val_split)


def training_batch(
    data: torch.Tensor, batch_size: int, seq_len: int, seed: int, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows (x, y = x shifted by one), (B, T) int64, determined by (seed, step)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=gen)
    windows = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()]).long()
    return windows[:, :-1], windows[:, 1:]


def validation_batches(
    val: torch.Tensor, batch_size: int, seq_len: int, count: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` fixed batches of evenly spaced held-out windows."""
    n_windows = batch_size * count
    span = val.numel() - seq_len - 1
    if span <= 0:
        raise ValueError(f"validation split ({val.numel()} bytes) is shorter than seq_len + 1")
    starts = torch.linspace(0, span, n_windows).long().tolist()
    windows = torch.stack([val[s : s + seq_len + 1] for s in starts]).long()
    return [
        (w[:, :-1], w[:, 1:]) for w in windows.split(batch_size)
    ]


def probe_sequence(val: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed probe: the first seq_len + 1 held-out bytes, as (1, T) inputs and targets."""
    window = val[: seq_len + 1].long().unsqueeze(0)
    return window[:, :-1], window[:, 1:]
