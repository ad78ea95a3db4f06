"""README stays true: its test command is CI's, its links resolve, its headline numbers are the
committed results'."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
NAMES = {"residual": "residual", "HC": "hc", "mHC": "mhc"}


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def relative_links(text: str) -> list[str]:
    """The targets of a Markdown text's links and images that are paths, not web addresses."""
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    return [t for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


def test_ci_runs_the_readme_test_command():
    test_command = next(b.strip() for b in _bash_blocks() if "pytest" in b)
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_readme_first_command_runs_the_smoke_experiment():
    first = _bash_blocks()[0].strip()
    assert first.endswith("mhc-lab run experiments/smoke.yaml")
    assert (ROOT / "experiments" / "smoke.yaml").exists()


def test_readme_is_short():
    assert len(README.splitlines()) < 200


def test_every_link_from_readme_resolves():
    links = relative_links(README)
    to_docs = [t for t in links if t.startswith("docs/")]
    assert len(to_docs) >= 6, to_docs  # results, experiment file, results format, scaling out, design, architecture
    assert "docs/architecture.md" in to_docs
    missing = [t for t in links if not (ROOT / t.split("#")[0]).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"


def _agrees(printed: str, value: float) -> bool:
    """Whether `value` rounds to the number as printed (`6.1e14`, `1.07`, `60`): within half a
    unit of its last printed digit."""
    mantissa, _, exponent = printed.partition("e")
    decimals = len(mantissa.partition(".")[2])
    unit = 10.0 ** (int(exponent or 0) - decimals)
    return math.isfinite(value) and abs(value - float(printed)) <= unit / 2 * (1 + 1e-9)


def _headline_rows(text: str) -> list[list[str]]:
    rows = re.findall(r"^\| (residual|HC|mHC) \| (\d) \|(.*)\|$", text, flags=re.M)
    return [[conn, seed, *(c.strip() for c in rest.split("|"))] for conn, seed, rest in rows]


@pytest.mark.parametrize("doc", ["README.md", "docs/results.md"])
def test_headline_table_is_the_committed_results(doc):
    """Every number of the headline table (README and docs/results.md) is what the committed
    results/divergence folder holds: summaries, and stability measured from the metrics."""
    import numpy as np

    from mhc_lab.analysis.view import load_view

    text = (ROOT / doc).read_text()
    section = text[text.index("experiments/divergence.yaml"):]
    section = section[: section.index("Peak gains are")]
    rows = _headline_rows(section)
    assert len(rows) == 9, rows
    view = load_view(ROOT / "results" / "divergence")
    runs = {(r.connection, r.seed): r for r in view.runs}
    for conn, seed, fwd, bwd, where, final, growth, grad, rise, val, wall in rows:
        run = runs[(NAMES[conn], int(seed))]
        s = run.summary
        label = f"{doc}: {conn} seed {seed}"
        assert _agrees(fwd, s["max_gain_fwd"]) and _agrees(bwd, s["max_gain_bwd"]), label
        assert where == f"{s['max_gain_step']} / {s['max_gain_layer']}", label
        final_fwd, final_bwd = final.split(" / ")
        assert _agrees(final_fwd, s["final_gain_fwd"]) and _agrees(final_bwd, s["final_gain_bwd"]), label
        assert _agrees(growth, s["max_signal_growth"]), label
        top, top_step, median = re.fullmatch(r"(\S+) \((\d+)\) / (\S+)", grad).groups()
        stab = run.stability
        steps, norms = run.metric("grad_norm")
        warm = int(run.config["train.warmup"])
        assert _agrees(top, stab.max_grad_norm) and int(top_step) == stab.grad_step, label
        assert _agrees(median, float(np.median(norms[steps >= warm]))), label
        size, rise_step = re.fullmatch(r"(\S+) \((\d+)\)", rise).groups()
        assert _agrees(size, stab.loss_rise) and int(rise_step) == stab.rise_step, label
        assert _agrees(val, s["final_val_loss"]) and _agrees(wall, s["wall_s"]), label


def test_shipped_experiments_validate():
    from mhc_lab.experiment.loader import load_experiment

    for path in sorted((ROOT / "experiments").glob("*.yaml")):
        assert load_experiment(path).runs, path


def _half_unit(printed: str) -> float:
    mantissa, _, exponent = printed.lower().partition("e")
    return 10.0 ** (int(exponent or 0) - len(mantissa.partition(".")[2])) / 2


def test_readme_results_example_prints_the_headline_table(monkeypatch, capsys):
    """The five-line pandas example prints the numbers of README's headline table."""
    pytest.importorskip("pandas", reason='pandas not installed (pip install -e ".[pandas]")')
    example = next(b for b in re.findall(r"```python\n(.*?)```", README, flags=re.S) if "results.load" in b)
    assert len(example.strip().splitlines()) <= 5
    monkeypatch.chdir(ROOT)
    exec(example, {})
    header, *lines = capsys.readouterr().out.splitlines()
    columns = header.split()
    printed = {(cells[0], int(cells[1])): dict(zip(columns, cells)) for cells in (line.split() for line in lines)}
    assert len(printed) == 9
    text = README[README.index("experiments/divergence.yaml"):]
    for conn, seed, fwd, bwd, where, final, growth, grad, rise, val, wall in _headline_rows(text[: text.index("Peak gains are")]):
        row = printed[(NAMES[conn], int(seed))]
        top, top_step, median = re.fullmatch(r"(\S+) \((\d+)\) / (\S+)", grad).groups()
        size, rise_step = re.fullmatch(r"(\S+) \((\d+)\)", rise).groups()
        assert where == f"{row['max_gain_step']} / {row['max_gain_layer']}", (conn, seed)
        assert top_step == row["max_grad_norm_step"] and rise_step == row["max_loss_rise_step"], (conn, seed)
        final_fwd, final_bwd = final.split(" / ")
        for ours, column in ((fwd, "max_gain_fwd"), (bwd, "max_gain_bwd"), (final_fwd, "final_gain_fwd"),
                             (final_bwd, "final_gain_bwd"), (growth, "max_signal_growth"),
                             (top, "max_grad_norm"), (median, "median_grad_norm"), (size, "max_loss_rise"),
                             (val, "final_val_loss"), (wall, "wall_s")):
            shown = row[column]
            assert abs(float(ours) - float(shown)) <= _half_unit(ours) + _half_unit(shown), (conn, seed, column, shown)
