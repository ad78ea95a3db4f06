"""The house stays readable: docs/architecture.md names every module, and the stages import only
the stages before them (experiment -> launch -> training -> store -> analysis, DESIGN's flow)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mhc_lab"
LAYOUT = (ROOT / "docs" / "architecture.md").read_text()
# A stage may import itself and the stages listed after it (the lower ones), never the others.
LOWER = {
    "cli": {"experiment", "nn", "probe", "training", "store", "launch", "analysis", "bench", "errors"},
    "bench": {"experiment", "nn", "errors"},
    "results": {"analysis", "errors"},
    "analysis": {"experiment", "probe", "store", "errors"},
    "launch": {"experiment", "training", "store", "errors"},
    "training": {"experiment", "nn", "probe", "store", "errors"},
    "store": {"errors"},
    "probe": set(),  # pure functions of H_res and of what the model hands over
    "nn": {"experiment"},
    "experiment": {"errors"},
    "errors": set(),
}


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py"))


def _stage(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.name != "__init__.py" else "package"


def _imported_stages(path: Path) -> set[str]:
    """The mhc_lab stages a module imports (anywhere in it, function bodies included)."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    base = package if path.name == "__init__.py" else package.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")[: len(base.split(".")) - (node.level - 1)]
                target = ".".join(parts + ([node.module] if node.module else []))
                names = [f"{target}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "mhc_lab" and len(parts) > 1:
                found.add(parts[1])
    return found


def _has_logic(path: Path) -> bool:
    """A module beyond a package face: it defines a function or a class."""
    tree = ast.parse(path.read_text())
    return any(isinstance(node, (ast.FunctionDef, ast.ClassDef)) for node in tree.body)


def test_every_module_is_named_in_the_layout_doc():
    """Every module, and every package `__init__.py` that holds more than re-exports."""
    missing = [
        str(p.relative_to(PACKAGE)) for p in _modules()
        if (p.name != "__init__.py" or _has_logic(p)) and str(p.relative_to(PACKAGE)) not in LAYOUT
    ]
    assert not missing, f"docs/architecture.md does not name: {missing}"


def test_stages_import_only_lower_stages():
    wrong = []
    for path in _modules():
        stage = _stage(path)
        if stage == "package":
            continue
        allowed = LOWER[stage] | {stage}
        for imported in _imported_stages(path) - allowed:
            if imported != "__version__":
                wrong.append(f"{path.relative_to(ROOT)} imports mhc_lab.{imported}")
    assert not wrong, wrong


def test_the_public_names_resolve():
    import mhc_lab

    for name in mhc_lab.__all__:
        assert getattr(mhc_lab, name) is not None, name
