"""Bad input: one line naming the file and the key, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mhc_lab.experiment.config import ExperimentConfig

from .helpers import cli, write_experiment

SCHEMA = Path(__file__).resolve().parents[1] / "mhc_lab" / "experiment" / "schema" / "experiment.schema.json"


def _run_bad(tmp_path: Path, exp: Path, *extra: str):
    out = tmp_path / "out"
    result = cli("run", exp, "--out", out, *extra)
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert len(message.splitlines()) == 1, message
    assert "Traceback" not in message
    assert not out.exists(), "nothing may be written for bad input"
    return message


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"model": {"dpth": 3}}, ["model.dpth", "unknown key", "did you mean 'depth'"]),
        ({"trian": {"steps": 3}}, ["trian", "unknown key", "did you mean 'train'"]),
        ({"model": {"depth": 0}}, ["model.depth", "greater than or equal to 1", "got 0"]),
        ({"model": {"depth": "deep"}}, ["model.depth", "integer"]),
        ({"model": {"heads": 3}}, ["model", "heads (3) must divide d_model (16)"]),
        ({"model": {"n_streams": 9}}, ["model.n_streams", "less than or equal to 8"]),
        ({"train": {"lr": -0.1}}, ["train.lr", "greater than 0"]),
        ({"model": {"connection": "hyper"}}, ["model.connection", "'residual', 'hc', 'mhc', 'mhc_lite', 'kromhc' or 'ortho'"]),
        ({"data": {"path": "missing/*.txt"}}, ["data.path", "no file matches"]),
        ({"sweep": {"grid": {"model.depth": []}}}, ["sweep.grid.model.depth", "empty list"]),
        ({"sweep": {"grid": {"model.dept": [1]}}}, ["sweep.grid.model.dept", "did you mean 'depth'"]),
        ({"sweep": {"grid": {"model.depth": [2, 0]}}}, ["sweep value model.depth=0"]),
        ({"sweep": {"points": [{"train.lr": "fast"}]}}, ["train.lr", "fast"]),
        ({"sweep": {"grid": {"model": [1]}}}, ["sweep.grid.model", "is a section"]),
        ({"name": "has space"}, ["name", "pattern"]),
    ],
)
def test_bad_values_name_file_and_key(tmp_path, overrides, expected):
    exp = write_experiment(tmp_path, overrides)
    message = _run_bad(tmp_path, exp)
    assert str(exp) in message
    for part in expected:
        assert part in message, message


def test_line_number_is_given_where_yaml_knows_it(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text("name: x\nmodel:\n  d_model: 16\n  heads: 2\n  depth: 0\n")
    message = _run_bad(tmp_path, exp)
    assert f"{exp}:5:" in message and "model.depth" in message


def test_malformed_yaml(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text("name: x\nmodel: {d_model: 16\n  heads: [\n")
    message = _run_bad(tmp_path, exp)
    assert "malformed YAML" in message and str(exp) in message


def test_top_level_must_be_a_mapping(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text("- just\n- a list\n")
    assert "top level" in _run_bad(tmp_path, exp)


def test_missing_file(tmp_path):
    message = _run_bad(tmp_path, tmp_path / "nope.yaml")
    assert "nope.yaml" in message and "no such file" in message


def test_bad_set_override(tmp_path):
    exp = write_experiment(tmp_path)
    assert "(from --set)" in _run_bad(tmp_path, exp, "--set", "model.depth=0")
    assert "KEY=VALUE" in _run_bad(tmp_path, exp, "--set", "model.depth")
    assert "did you mean 'depth'" in _run_bad(tmp_path, exp, "--set", "model.dept=2")


def test_bad_option_value_names_the_option(tmp_path):
    exp = write_experiment(tmp_path)
    assert "launcher.workers (from --workers)" in _run_bad(tmp_path, exp, "--workers", "0")
    assert "train.device (from --device)" in _run_bad(tmp_path, exp, "--device", "tpu")
    assert "train.device (from --set)" in _run_bad(tmp_path, exp, "--set", "train.device=tpu")


def test_missing_name(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text("model: {depth: 2}\n")
    message = _run_bad(tmp_path, exp)
    assert "name" in message and "required" in message.lower()


def test_published_schema_is_up_to_date():
    """`mhc-lab schema --out mhc_lab/experiment/schema/experiment.schema.json` regenerates it."""
    assert json.loads(SCHEMA.read_text()) == ExperimentConfig.model_json_schema()


def test_schema_command_prints_the_schema():
    result = cli("schema")
    assert result.exit_code == 0
    assert json.loads(result.output)["properties"]["model"]


def test_out_that_is_a_file_gives_one_line(tmp_path):
    exp = write_experiment(tmp_path)
    blocker = tmp_path / "results"
    blocker.write_text("not a folder")
    result = cli("run", exp, "--out", blocker)
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert blocker.read_text() == "not a folder"
