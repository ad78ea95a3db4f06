"""`mhc-lab bench` on a tiny config: well-formed rows, JSON and CLI output (never timings)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from mhc_lab.bench import BenchRow, BenchSettings, peer_available, render_table, run_bench, to_json
from mhc_lab.cli import app
from mhc_lab.errors import MhcLabError

TINY = dict(d_models=[16], depth=1, n_streams=2, seq_len=8, batch=2, steps=2, warmup=1, sinkhorn_iters=3)


def _check_rows(rows: list[BenchRow], variants: list[str]) -> None:
    assert [r.variant for r in rows] == variants
    for r in rows:
        assert r.d_model == 16
        assert r.median_ms > 0 and r.min_ms > 0 and r.min_ms <= r.median_ms
        assert r.ratio > 0 and r.saved_mb > 0 and r.params > 0
        assert r.peak_mb is None or r.peak_mb == r.peak_mb  # a number, not NaN
    by_name = {r.variant: r for r in rows}
    assert by_name["residual"].ratio == 1.0
    # More streams, more parameters and more saved activations than the plain residual.
    assert by_name["mhc"].params > by_name["hc"].params > by_name["residual"].params
    assert by_name["mhc"].saved_mb > by_name["residual"].saved_mb


def test_rows_and_json_are_well_formed():
    settings = BenchSettings(**TINY, peer=False, threads=1)
    rows = run_bench(settings)
    _check_rows(rows, ["residual", "hc", "mhc"])
    doc = json.loads(to_json(rows, settings))
    assert doc["environment"]["settings"]["d_models"] == [16]
    assert doc["environment"]["threads"] == 1
    assert [r["variant"] for r in doc["rows"]] == ["residual", "hc", "mhc"]
    assert set(doc["rows"][0]) == {"variant", "d_model", "median_ms", "min_ms", "ratio", "peak_mb", "saved_mb", "params"}
    assert render_table(rows, settings).row_count == 3


@pytest.mark.skipif(not peer_available(), reason="hyper-connections (the `peer` extra) not installed")
def test_peer_rows_when_installed():
    rows = run_bench(BenchSettings(**TINY, peer=True, threads=1))
    assert [r.variant for r in rows] == ["residual", "hc", "mhc", "peer-hc", "peer-mhc"]


@pytest.mark.parametrize(
    "bad,option",
    [(dict(d_models=[]), "--d-model"), (dict(d_models=[18]), "--d-model 18"), (dict(steps=0), "--steps"),
     (dict(device="tpu"), "--device")],
)
def test_bad_settings_name_the_option(bad, option):
    with pytest.raises(MhcLabError, match=option):
        run_bench(BenchSettings(**{**TINY, **bad}))


def test_cli_bench_json_and_table():
    args = ["bench", "--d-model", "16", "--depth", "1", "--n-streams", "2", "--steps", "2", "--warmup", "0",
            "--batch", "2", "--seq-len", "8", "--sinkhorn-iters", "3", "--no-peer", "--threads", "1"]
    runner = CliRunner()
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [r["variant"] for r in doc["rows"]] == ["residual", "hc", "mhc"]
    table = runner.invoke(app, args)
    assert table.exit_code == 0, table.output
    assert "x residual" in table.stdout and "mhc" in table.stdout
    bad = runner.invoke(app, ["bench", "--d-model", "18", "--no-peer"])
    assert bad.exit_code == 2 and "--d-model 18" in bad.output
