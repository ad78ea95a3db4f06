"""`mhc-lab report`: REPORT.md with the experiment, runs, gains against the paper, figures."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from mhc_lab.analysis.view import dead_from, stability

from .helpers import cli
from .results_fixtures import copy_results, reseal, results_folder


@pytest.fixture(scope="module")
def sweep_report(tmp_path_factory):
    folder = results_folder("sweep", tmp_path_factory)
    result = cli("report", folder)
    assert result.exit_code == 0, result.output
    return folder, (folder / "REPORT.md").read_text(), result.output


def test_report_holds_experiment_environment_and_run_table(sweep_report):
    folder, text, _ = sweep_report
    assert text.startswith("# sweep\n")
    assert (folder / "experiment.yaml").read_text().strip() in text
    assert "corpus sha256" in text and "torch" in text
    run_ids = [p.name for p in (folder / "runs").iterdir()]
    assert len(run_ids) == 12
    for run_id in run_ids:
        assert re.search(rf"^\| {re.escape(run_id)} \| \w+ \| completed \|", text, re.M), run_id
    assert "None: every run completed." in text


def test_report_compares_gains_with_the_paper(sweep_report):
    _, text, output = sweep_report
    section = text.split("## Peak gain: measured vs the paper")[1].split("## Figures")[0]
    for name, paper in (("residual", "1 (by construction)"), ("HC", "≈ 3000"),
                        ("mHC", "≤ ≈ 1.6 (forward 1 by construction)")):
        assert re.search(rf"^\| {name} \|.*\| {re.escape(paper)} \|$", section, re.M), name
    assert "HC" in output and "≈ 3000" in output  # the key table on the terminal


def test_report_cites_only_what_the_repository_or_the_paper_holds(sweep_report):
    _, text, _ = sweep_report
    assert "DESIGN.md" not in text  # a file outside the repository (issue #17)


def test_stability_measures_count_only_after_warmup():
    steps = np.arange(10.0)
    loss = np.array([5, 4, 3, 3.5, 2, 8, 2, 2, 2, 2], dtype=float)
    grad = np.array([50, 1, 1, 1, 1, 20, 1, 1, 1, 1], dtype=float)
    s = stability(steps, loss, grad, start=2)
    assert (s.max_grad_norm, s.grad_step, s.grad_spikes) == (20.0, 5, 1)
    assert (s.loss_rise, s.rise_step) == (6.0, 5)  # 8 - min(5, 4, 3, 3.5, 2)
    whole = stability(steps, loss, grad, start=0)
    assert (whole.max_grad_norm, whole.grad_step, whole.grad_spikes) == (50.0, 0, 2)
    assert stability(steps, loss, grad, start=10) is None
    loss[7], grad[8] = np.nan, np.inf  # a diverged step counts, as infinity
    broken = stability(steps, loss, grad, start=2)
    assert (broken.max_grad_norm, broken.grad_step, broken.loss_rise, broken.rise_step) == (np.inf, 8, np.inf, 7)
    gaps = stability(np.array([0.0, 5, 10, 15]), np.array([5.0, 3, 4, 2]), np.array([9.0, 1, 2, 1]), start=5)
    assert (gaps.loss_rise, gaps.rise_step, gaps.max_grad_norm, gaps.grad_step) == (1.0, 10, 2.0, 10)
    assert s.dead_from is None


def test_a_run_is_dead_from_where_its_gradient_stays_exactly_zero():
    steps = np.arange(0.0, 60, 10)
    assert dead_from(steps, np.array([5.0, 1, 0, 2, 0, 0])) == 40  # the zero at 20 was not for good
    assert dead_from(steps, np.array([5.0, 1, 2, 3, 4, 0])) is None  # one zero step is not enough
    assert dead_from(steps, np.array([5.0, 1, 2, 0, np.nan, 0])) is None  # a diverged step is not frozen
    assert dead_from(steps, np.zeros(6)) == 0
    loss = np.array([5.4, 3.0, 5.545, 5.545, 5.545, 5.545])
    frozen = stability(steps, loss, np.array([5.0, 1, 0, 0, 0, 0]), start=10)
    assert (frozen.dead_from, frozen.loss_rise, frozen.rise_step) == (20, 2.545, 20)
    assert frozen.grad_spikes == 0  # the live steps' median, not the dead zeros', is the baseline


def test_report_tabulates_training_stability_per_run(sweep_report):
    folder, text, _ = sweep_report
    section = text.split("## Training stability after warmup")[1].split("## Figures")[0]
    for run_id in (p.name for p in (folder / "runs").iterdir()):
        assert re.search(rf"^\| {re.escape(run_id)} \| \w+ \| [\d.e+]+ \| \d+ \| \d+ \| -?[\d.]+ \| \d+ \| [\d.]+ \| - \|$", section, re.M)
    assert re.search(r"^- mHC \(\d+ runs, medians\): largest gradient norm", section, re.M)


def test_report_names_a_dead_run(tmp_path, tmp_path_factory):
    folder = copy_results(results_folder("sweep", tmp_path_factory), tmp_path)
    run = next(p for p in sorted((folder / "runs").iterdir()) if p.name.startswith("hc-"))
    metrics = run / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    for row in rows[2:]:  # frozen from the third logged step on
        row["grad_norm"] = 0.0
    metrics.write_text("".join(json.dumps(row) + "\n" for row in rows))
    reseal(run)
    result = cli("report", folder)
    assert result.exit_code == 0, result.output
    text = (folder / "REPORT.md").read_text()
    step = rows[2]["step"]
    assert re.search(rf"^\| {re.escape(run.name)} \| hc \|.*\| {step} \|$", text, re.M)
    assert re.search(rf"^- HC: 1 of \d+ runs dead .*{re.escape(run.name)} from step {step}, final loss", text, re.M)


def test_report_links_every_figure_relatively(sweep_report):
    folder, text, _ = sweep_report
    figures = sorted(p.name for p in (folder / "figures").glob("*.png"))
    assert len(figures) == 7 and "constraint_health.png" in figures
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(links) == [f"figures/{name}" for name in figures]
    assert "sweep_heatmap: no two numeric settings" in text  # the skipped figure is named


def test_report_lists_failed_runs_with_their_reason(tmp_path_factory):
    folder = results_folder("single", tmp_path_factory)
    result = cli("report", folder)
    assert result.exit_code == 0, result.output
    text = (folder / "REPORT.md").read_text()
    problems = text.split("## Diverged, failed and unfinished runs")[1]
    assert re.search(r"\| hc-\S+ \| failed \| - \| ValueError: validation split .* shorter than seq_len", problems)
    assert "failed" in result.output


def test_report_on_a_folder_that_is_not_results(tmp_path):
    result = cli("report", tmp_path)
    assert result.exit_code == 2
    assert "not an mhc-lab results folder" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "REPORT.md").exists()
