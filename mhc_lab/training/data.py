"""The byte corpus: built-in (the Python standard library's own source) or user files.

Nothing is ever downloaded. The exact bytes used are fingerprinted (sha256), so two results
are known to share data. The split is deterministic: the last `val_fraction` of the bytes is
held out; the probe sequence is the first `seq_len + 1` held-out bytes, the same every probe.
Training batches depend only on (seed, step), so a resumed run sees the same batches.
"""

from __future__ import annotations

import hashlib
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


def read_bytes(files: list[Path], max_bytes: int) -> bytes:
    """Concatenate the files' bytes in order, stopping at `max_bytes`."""
    chunks: list[bytes] = []
    total = 0
    for f in files:
        if total >= max_bytes:
            break
        data = f.read_bytes()[: max_bytes - total]
        chunks.append(data)
        total += len(data)
    return b"".join(chunks)


@lru_cache(maxsize=4)
def _load(path: Optional[str], base_dir: Optional[str], max_bytes: int, val_fraction: float) -> Corpus:
    if path is None:
        files = stdlib_files()
        description = f"Python {sysconfig.get_python_version()} standard library source"
    else:
        files = user_files(path, Path(base_dir) if base_dir else None)
        description = f"files: {path}"
    raw = read_bytes(files, max_bytes)
    if len(raw) < 10_000:
        raise ValueError(f"corpus has only {len(raw)} bytes; at least 10000 are needed")
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    n_val = max(int(len(raw) * val_fraction), 1)
    return Corpus(
        train=data[:-n_val],
        val=data[-n_val:],
        fingerprint=hashlib.sha256(raw).hexdigest(),
        description=description,
        n_files=len(files),
    )


def load_corpus(cfg: DataConfig, base_dir: Optional[Path] = None) -> Corpus:
    """The corpus for a data config (cached per process)."""
    return _load(cfg.path, str(base_dir) if base_dir else None, cfg.max_bytes, cfg.val_fraction)


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
