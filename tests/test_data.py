"""The corpus split (`data.val_split`) and the stability of run ids across later config fields."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mhc_lab.experiment.config import DataConfig, RunConfig
from mhc_lab.experiment.sweep import make_run_id
from mhc_lab.training.data import hashed_validation, load_corpus, read_bytes, stdlib_files

RESULTS = Path(__file__).resolve().parents[1] / "results"


def test_tail_split_is_the_last_fraction_of_the_bytes():
    corpus = load_corpus(DataConfig(max_bytes=300_000))
    raw = read_bytes(stdlib_files(), 300_000)
    assert bytes(corpus.train.tolist()) + bytes(corpus.val.tolist()) == raw
    assert corpus.val.numel() == 30_000


def test_hashed_split_holds_out_whole_files_by_path():
    cfg = DataConfig(max_bytes=2_000_000, val_split="hashed")
    corpus = load_corpus(cfg)
    root = Path(__import__("sysconfig").get_paths()["stdlib"])
    files = stdlib_files()
    used, total = [], 0
    for f in files:
        if total >= cfg.max_bytes:
            break
        used.append(f)
        total += f.stat().st_size
    held = [f for f in used[:-1] if hashed_validation(f.relative_to(root).as_posix(), cfg.val_fraction)]
    val = bytes(corpus.val.tolist())
    assert held, "some file is held out"
    for f in held:  # every held-out file is in validation whole, none in training
        assert f.read_bytes() in val
    train = bytes(corpus.train.tolist())
    assert held[0].read_bytes()[:200] not in train or len(held[0].read_bytes()) < 200
    assert 0.03 < corpus.val.numel() / (corpus.val.numel() + corpus.train.numel()) < 0.2
    assert corpus.fingerprint == load_corpus(DataConfig(max_bytes=2_000_000)).fingerprint  # same bytes


def test_the_hash_is_stable_and_about_the_fraction():
    names = [f"pkg/module_{i}.py" for i in range(4000)]
    share = sum(hashed_validation(n, 0.1) for n in names) / len(names)
    assert 0.08 < share < 0.12
    assert hashed_validation("json/decoder.py", 0.1) == hashed_validation("json/decoder.py", 0.1)


def test_hashed_split_of_one_file_is_refused(tmp_path):
    (tmp_path / "one.txt").write_bytes(b"x" * 20_000)
    with pytest.raises(ValueError, match="val_split hashed"):
        load_corpus(DataConfig(path=str(tmp_path / "one.txt"), val_split="hashed"))


def test_later_fields_at_their_defaults_keep_run_ids():
    """sinkhorn_tol and val_split came after results were committed: at their defaults they
    leave the run id as it was; set, they make a different run."""
    base = RunConfig.model_validate({"model": {"connection": "mhc"}})
    same = RunConfig.model_validate({"model": {"connection": "mhc", "sinkhorn_tol": None},
                                     "data": {"val_split": "tail"}})
    assert make_run_id(base) == make_run_id(same)
    tol = RunConfig.model_validate({"model": {"connection": "mhc", "sinkhorn_tol": 1e-6}})
    hashed = RunConfig.model_validate({"model": {"connection": "mhc"}, "data": {"val_split": "hashed"}})
    assert len({make_run_id(base), make_run_id(tol), make_run_id(hashed)}) == 3


COMMITTED = sorted(RESULTS.glob("*/runs/*/config.yaml"))


@pytest.mark.parametrize("config", COMMITTED, ids=lambda p: f"{p.parents[2].name}/{p.parent.name}")
def test_committed_runs_keep_their_ids(config: Path):
    """Every committed run's resolved config still hashes to its folder's name, so a rerun of
    its experiment finds it done."""
    cfg = RunConfig.model_validate(yaml.safe_load(config.read_text()))
    assert make_run_id(cfg) == config.parent.name


def test_hashed_split_does_not_move_with_max_bytes(tmp_path):
    """Files are named relative to the folder of all the corpus's files, so reading fewer bytes
    (a smaller max_bytes) holds out the same files, never moving one between the splits."""
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        for i in range(40):
            (tmp_path / sub / f"f{i:02d}.txt").write_bytes(bytes([65 + i % 26]) * 2_000 + f"{sub}{i}".encode())
    small = load_corpus(DataConfig(path=str(tmp_path), max_bytes=60_000, val_split="hashed"))
    large = load_corpus(DataConfig(path=str(tmp_path), max_bytes=1_000_000, val_split="hashed"))
    small_val, large_val = bytes(small.val.tolist()), bytes(large.val.tolist())
    assert large_val.startswith(small_val[: len(small_val) - 2_100])  # same held-out files, in order
    assert small.n_files == large.n_files == 80  # the files the source names
