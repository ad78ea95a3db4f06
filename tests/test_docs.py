"""docs/ stays true: the experiment-file reference is the code's, its example validates, and
every link between the documents resolves.

The key reference in docs/experiment-file.md is generated from the config classes; after
adding or changing a key, regenerate it with

    python tests/test_docs.py --write
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

from mhc_lab.experiment.config import ExperimentConfig, reference_markdown

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXPERIMENT_FILE = DOCS / "experiment-file.md"
BEGIN = re.compile(r"<!-- BEGIN reference_markdown\(\)[^\n]*-->\n\n")
END = "\n<!-- END reference_markdown() -->"


def generated_region(text: str) -> tuple[int, int]:
    """Where the generated reference starts and ends in docs/experiment-file.md."""
    begin = BEGIN.search(text)
    assert begin is not None, f"{EXPERIMENT_FILE}: no BEGIN reference_markdown() marker"
    end = text.index(END, begin.end())
    return begin.end(), end


def with_current_reference(text: str) -> str:
    """docs/experiment-file.md with its generated region replaced by reference_markdown()."""
    start, end = generated_region(text)
    return text[:start] + reference_markdown() + text[end:]


def test_experiment_file_reference_is_generated_from_the_code():
    text = EXPERIMENT_FILE.read_text()
    start, end = generated_region(text)
    assert text[start:end] == reference_markdown(), (
        "docs/experiment-file.md is out of date with mhc_lab/experiment/config.py; "
        "regenerate it with: python tests/test_docs.py --write"
    )


def test_experiment_file_lists_every_section():
    reference = reference_markdown()
    for section in ("data", "model", "train", "probe", "sweep", "launcher"):
        assert f"**{section}**" in reference


def test_yaml_example_in_experiment_file_validates():
    example = re.search(r"```yaml\n(.*?)```", EXPERIMENT_FILE.read_text(), flags=re.S).group(1)
    ExperimentConfig.model_validate(yaml.safe_load(example))


def test_every_link_in_docs_resolves():
    from .test_readme import relative_links

    missing = []
    for doc in sorted(DOCS.glob("*.md")):
        for target in relative_links(doc.read_text()):
            if not (doc.parent / target.split("#")[0]).exists():
                missing.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not missing, f"links to files that do not exist: {missing}"


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_docs.py --write   (regenerates docs/experiment-file.md's key reference)")
    EXPERIMENT_FILE.write_text(with_current_reference(EXPERIMENT_FILE.read_text()))
    print(f"wrote {EXPERIMENT_FILE}")
