"""README stays true: its test command is CI's, its config reference matches the code."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from mhc_lab.experiment.config import ExperimentConfig, reference_markdown

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def test_ci_runs_the_readme_test_command():
    test_command = next(b.strip() for b in _bash_blocks() if "pytest" in b)
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_readme_first_command_runs_the_smoke_experiment():
    first = _bash_blocks()[0].strip()
    assert first.endswith("mhc-lab run experiments/smoke.yaml")
    assert (ROOT / "experiments" / "smoke.yaml").exists()


def test_config_reference_is_generated_from_the_code():
    """Regenerate with: python -c 'from mhc_lab.experiment.config import reference_markdown as r; print(r())'"""
    assert reference_markdown() in README


def test_yaml_example_in_readme_validates():
    example = re.search(r"```yaml\n(.*?)```", README, flags=re.S).group(1)
    ExperimentConfig.model_validate(yaml.safe_load(example))


def test_shipped_experiments_validate():
    from mhc_lab.experiment.loader import load_experiment

    for path in sorted((ROOT / "experiments").glob("*.yaml")):
        assert load_experiment(path).runs, path
