"""`mhc-lab bench` on a tiny config: well-formed rows, JSON and CLI output (never timings)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from mhc_lab.nn import native
from mhc_lab.bench import BenchRow, BenchSettings, peer_available, render_table, run_bench, to_json
from mhc_lab.cli import app
from mhc_lab.errors import MhcLabError

TINY = dict(d_models=[16], depth=1, n_streams=2, seq_len=8, batch=2, steps=2, warmup=1, sinkhorn_iters=3)
OWN = ["residual", "hc", "mhc", "mhc_lite", "kromhc", "ortho"]  # every connection, the exact variants too


def _check_rows(rows: list[BenchRow], variants: list[str]) -> None:
    assert [r.variant for r in rows] == variants
    for r in rows:
        assert r.d_model == 16
        assert r.median_ms > 0 and r.min_ms > 0 and r.min_ms <= r.median_ms
        assert r.ratio > 0 and r.saved_mb > 0 and r.params > 0
        assert r.peak_mb is None or r.peak_mb == r.peak_mb  # a number, not NaN
    by_name = {r.variant: r for r in rows}
    assert by_name["residual"].ratio == 1.0 and by_name["mhc"].vs_mhc == 1.0
    assert all(r.vs_mhc > 0 for r in rows)
    # More streams, more parameters and more saved activations than the plain residual.
    assert by_name["mhc"].params > by_name["hc"].params > by_name["residual"].params
    assert by_name["mhc"].saved_mb > by_name["residual"].saved_mb


def test_rows_and_json_are_well_formed():
    settings = BenchSettings(**TINY, peer=False, threads=1)
    rows = run_bench(settings)
    _check_rows(rows, OWN)
    doc = json.loads(to_json(rows, settings))
    assert doc["environment"]["settings"]["d_models"] == [16]
    assert doc["environment"]["threads"] == 1
    assert [r["variant"] for r in doc["rows"]] == OWN
    assert set(doc["rows"][0]) == {
        "variant", "d_model", "median_ms", "min_ms", "ratio", "vs_mhc", "peak_mb", "saved_mb", "params", "compile_s"
    }
    assert all(r["compile_s"] is None for r in doc["rows"])  # eager by default
    table = render_table(rows, settings)
    assert table.row_count == len(OWN)
    assert [r.variant for r in run_bench(BenchSettings(**TINY, peer=False, exact=False, threads=1))] == OWN[:3]
    # which path was timed: the fused CPU kernels when they built (CI has a compiler)
    assert doc["environment"]["native_kernels"] == (native.library() is not None)
    assert ("native kernels" if native.library() is not None else "torch ops only") in str(table.title)


@pytest.mark.skipif(not peer_available(), reason="hyper-connections (the `peer` extra) not installed")
def test_peer_rows_when_installed():
    rows = run_bench(BenchSettings(**TINY, peer=True, exact=False, threads=1))
    assert [r.variant for r in rows] == ["residual", "hc", "mhc", "peer-hc", "peer-mhc"]


@pytest.mark.parametrize(
    "bad,option",
    [(dict(d_models=[]), "--d-model"), (dict(d_models=[18]), "--d-model 18"), (dict(steps=0), "--steps"),
     (dict(device="tpu"), "--device")],
)
def test_bad_settings_name_the_option(bad, option):
    with pytest.raises(MhcLabError, match=option):
        run_bench(BenchSettings(**{**TINY, **bad}))


def _fake_compile(monkeypatch) -> list[torch.nn.Module]:
    """Replace torch.compile by a recording identity: a real compile takes 10-20 s per model
    on a cold cache, too slow for a unit test (`mhc-lab bench --compile` was checked by hand,
    BENCHMARKS.md). Returns the list of compiled models."""
    compiled: list[_Counted] = []

    def fake(model: torch.nn.Module) -> torch.nn.Module:
        compiled.append(_Counted(model))
        return compiled[-1]

    monkeypatch.setattr(torch, "compile", fake)
    return compiled


class _Counted(torch.nn.Module):
    """What the fake torch.compile returns: the model, counting the calls that go through it."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)


def test_compile_wraps_every_variant_and_times_the_first_step_apart(monkeypatch):
    compiled = _fake_compile(monkeypatch)
    settings = BenchSettings(**TINY, peer=peer_available(), threads=1, compile=True)
    rows = run_bench(settings)
    variants = [*OWN, *(["peer-hc", "peer-mhc"] if peer_available() else [])]
    _check_rows(rows, variants)
    assert len(compiled) == len(variants)  # the residual too: the ratios compare like with like
    assert all(c.calls >= 1 + TINY["steps"] for c in compiled)  # the timed steps run the compiled one
    assert all(r.compile_s is not None and r.compile_s > 0 for r in rows)
    table = render_table(rows, settings)
    assert table.row_count == len(variants) and table.columns[-1].header == "compile s"


def test_cli_bench_compile_flag(monkeypatch):
    compiled = _fake_compile(monkeypatch)
    args = ["bench", "--d-model", "16", "--depth", "1", "--n-streams", "2", "--steps", "1", "--warmup", "0",
            "--batch", "2", "--seq-len", "8", "--sinkhorn-iters", "3", "--no-peer", "--threads", "1"]
    result = CliRunner().invoke(app, [*args, "--compile", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["environment"]["settings"]["compile"] is True
    assert len(compiled) == len(OWN) and all(r["compile_s"] > 0 for r in doc["rows"])


def test_cli_bench_json_and_table():
    args = ["bench", "--d-model", "16", "--depth", "1", "--n-streams", "2", "--steps", "2", "--warmup", "0",
            "--batch", "2", "--seq-len", "8", "--sinkhorn-iters", "3", "--no-peer", "--threads", "1"]
    runner = CliRunner()
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [r["variant"] for r in doc["rows"]] == OWN
    table = runner.invoke(app, [*args, "--no-exact"])
    assert table.exit_code == 0, table.output
    assert "x residual" in table.stdout and "x mHC" in table.stdout and "kromhc" not in table.stdout
    bad = runner.invoke(app, ["bench", "--d-model", "18", "--no-peer"])
    assert bad.exit_code == 2 and "--d-model 18" in bad.output


def test_presets_fill_the_shape_and_explicit_options_win():
    from mhc_lab.bench import PRESETS

    headline = BenchSettings.from_preset("headline")
    assert (headline.d_models, headline.depth, headline.batch, headline.seq_len) == ([64], 45, 16, 64)
    assert headline.preset == "headline"
    tweaked = BenchSettings.from_preset("headline", depth=2, steps=3, d_models=None)
    assert (tweaked.depth, tweaked.steps, tweaked.d_models) == (2, 3, [64])
    plain = BenchSettings.from_preset(None, depth=None)
    assert plain == BenchSettings()
    assert BenchSettings.from_preset("reference") == BenchSettings(**PRESETS["reference"], preset="reference")
    with pytest.raises(MhcLabError, match="--preset nope: choose one of headline, reference"):
        BenchSettings.from_preset("nope")


def test_cli_bench_preset_in_the_record_and_bad_name():
    args = ["bench", "--preset", "headline", "--depth", "1", "--d-model", "16", "--n-streams", "2", "--steps", "1",
            "--warmup", "0", "--batch", "2", "--seq-len", "8", "--sinkhorn-iters", "3", "--no-peer", "--threads", "1"]
    runner = CliRunner()
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    settings = json.loads(result.stdout)["environment"]["settings"]
    assert settings["preset"] == "headline" and settings["depth"] == 1 and settings["d_models"] == [16]
    bad = runner.invoke(app, ["bench", "--preset", "nope"])
    assert bad.exit_code != 0 and "--preset nope" in bad.output and "Traceback" not in bad.output


def test_a_step_is_the_trainers_step_with_the_logged_gradient_norm(monkeypatch):
    """The bench's step makes the trainer's gradient-norm call (a pass over every gradient that
    the trainer makes each step) after the backward and before the AdamW step, once per step."""
    import mhc_lab.bench as bench
    from mhc_lab.nn import model as nn_model

    calls = []

    def recording_norm(parameters, max_norm):
        params = list(parameters)
        calls.append(("norm", max_norm, all(p.grad is not None for p in params)))
        return nn_model.gradient_norm(params, max_norm)

    adamw_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        calls.append(("adamw",))
        return adamw_step(self, *args, **kwargs)

    monkeypatch.setattr(bench, "gradient_norm", recording_norm)
    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    model = bench.build_variant("mhc", 16, BenchSettings(**TINY, peer=False, threads=1), torch.device("cpu"))
    idx = torch.randint(0, 256, (2, 8))
    step = bench.make_step(model, (idx, idx))
    step()
    step()
    # after the backward (every gradient is there), before the update
    assert calls == [("norm", None, True), ("adamw",)] * 2
