"""The direction of the headline result on a shortened divergence config (about 15 s)."""

from __future__ import annotations

from pathlib import Path

import yaml

from mhc_lab.experiment.loader import load_experiment
from mhc_lab.launch import open_store, run_sweep

ROOT = Path(__file__).resolve().parents[1]


def test_hc_gain_grows_from_one_while_mhc_stays_bounded_and_residual_is_one(tmp_path):
    shipped = yaml.safe_load((ROOT / "experiments" / "divergence.yaml").read_text())
    shipped["sweep"] = {"grid": {"model.connection": ["residual", "hc", "mhc"]}}
    shipped["model"].update(d_model=16, heads=2)  # the shipped depth: the growth needs it
    shipped["train"].update(steps=24, warmup=4, batch_size=4, seq_len=16, threads=1)
    shipped["probe"].update(every=4, val_batches=1)
    shipped["data"]["max_bytes"] = 200_000
    path = tmp_path / "short.yaml"
    path.write_text(yaml.safe_dump(shipped))
    exp = load_experiment(path)
    with open_store(exp, tmp_path / "results") as store:
        outcome = run_sweep(exp, store)
    by_connection = {s["connection"]: s for s in outcome.summaries}

    residual, hc, mhc = by_connection["residual"], by_connection["hc"], by_connection["mhc"]
    assert residual["max_gain_fwd"] == residual["max_gain_bwd"] == 1.0
    # The growth comes from training: step 0 is exactly 1 for HC, the peak comes later.
    first = store.run(hc["run_id"]).probes.read_text().splitlines()[0]
    assert '"max_gain":1.0' in first
    assert max(hc["max_gain_fwd"], hc["max_gain_bwd"]) > 10.0 and hc["max_gain_step"] > 0
    assert max(mhc["max_gain_fwd"], mhc["max_gain_bwd"]) < 1.6
