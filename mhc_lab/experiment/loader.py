"""Read an experiment YAML file, apply `--set` overrides, validate, expand the sweep.

Every problem becomes one `MhcLabError` line naming the file, the key path and, where the
YAML parser knows it, the line: `exp.yaml:7: model.depth: Input should be greater than or
equal to 1 (got 0)`. Nothing is written here.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ValidationError

from .config import ExperimentConfig, RunConfig, user_files
from ..errors import MhcLabError
from .sweep import PlannedRun, expand


class ConfigError(MhcLabError):
    """Bad experiment input (exit code 2)."""


@dataclass(frozen=True)
class Experiment:
    """A validated experiment: its config, planned runs, and the file it came from."""

    path: Path
    text: str
    config: ExperimentConfig
    runs: list[PlannedRun]
    overrides: tuple[str, ...] = ()

    @property
    def base_dir(self) -> Path:
        return self.path.parent


def load_experiment(
    path: Path | str, overrides: list[str] | tuple[str, ...] = (), origins: Optional[dict[str, str]] = None
) -> Experiment:
    """Load, override, validate and expand an experiment file, or raise ConfigError.

    `overrides` are `KEY=VALUE` items; an error in one names its origin: `origins[KEY]` (a
    command-line option such as `--workers`), else `--set`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    try:
        root_node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: malformed YAML: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys (name, model, train, ...)")
    lines = _key_lines(root_node)
    for item in overrides:
        _apply_override(path, data, item)
    set_keys = {key: (origins or {}).get(key, "--set") for key in _override_keys(overrides)}
    config = _validate(path, lines, data, set_keys)
    _refuse_swept_overrides(path, lines, config, set_keys)
    runs = _expand(path, lines, config)
    _check_data_paths(path, lines, runs)
    return Experiment(path, text, config, runs, tuple(overrides))


def _apply_override(path: Path, data: dict, item: str) -> None:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set model.depth=24")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML") from None
    node = data
    parts = key.split(".")
    if parts[:2] == ["sweep", "grid"] and len(parts) > 3:  # grid keys are dotted themselves
        parts = ["sweep", "grid", ".".join(parts[2:])]
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{path}: --set {key}: {part!r} is not a section")
    node[parts[-1]] = value


def _refuse_swept_overrides(path: Path, lines: dict[str, int], config: ExperimentConfig, set_keys: dict[str, str]) -> None:
    """A key given with --set that the sweep also sets would be silently overridden by the
    sweep's values in every run: refused, with the way to change the sweep instead."""
    grid = set(config.sweep.grid)
    points = {key for point in config.sweep.points for key in point}
    for key, origin in set_keys.items():
        if key in grid or key in points:
            section = "sweep.grid" if key in grid else "sweep.points"
            fix = (f"--set 'sweep.grid.{key}=[...]'" if key in grid else "edit sweep.points")
            raise ConfigError(
                f"{_where(path, lines, f'{section}.{key}' if key in grid else section)}: {origin} {key}: "
                f"{section} sets {key} for every run it makes, so the sweep's values would win; "
                f"change them instead ({fix})"
            )


def _override_keys(overrides) -> list[str]:
    return [item.partition("=")[0].strip() for item in overrides]


def _validate(path: Path, lines: dict[str, int], data: dict, set_keys: dict[str, str]) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = _dotted(err["loc"])
        source = f" (from {set_keys[key]})" if key in set_keys else ""
        raise ConfigError(
            f"{_where(path, lines, key)}: {key}{source}: {_describe(err, ExperimentConfig)}"
        ) from None


def _expand(path: Path, lines: dict[str, int], config: ExperimentConfig) -> list[PlannedRun]:
    for section, entries in (("grid", config.sweep.grid.items()), ("points", _point_items(config))):
        for key, values in entries:
            field = f"sweep.{section}.{key}"
            if section == "grid" and not values:
                raise ConfigError(f"{_where(path, lines, field)}: {field}: empty list; give at least one value")
            problem = _unknown_dotted_key(key)
            if problem:
                raise ConfigError(f"{_where(path, lines, f'sweep.{section}')}: {field}: {problem}")
    try:
        runs = expand(config)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = _dotted(err["loc"])
        value = err.get("input")
        raise ConfigError(
            f"{_where(path, lines, 'sweep')}: sweep value {key}={value!r}: {_describe(err, RunConfig)}"
        ) from None
    if not runs:
        raise ConfigError(f"{path}: sweep: the sweep produces no runs")
    return runs


def _point_items(config: ExperimentConfig):
    for point in config.sweep.points:
        for key, value in point.items():
            yield key, [value]


def _check_data_paths(path: Path, lines: dict[str, int], runs: list[PlannedRun]) -> None:
    for data_path in sorted({r.config.data.path for r in runs if r.config.data.path}):
        if not user_files(data_path, path.parent):
            raise ConfigError(
                f"{_where(path, lines, 'data.path')}: data.path: no file matches {data_path!r} "
                f"(relative paths are relative to {path.parent})"
            )


def _unknown_dotted_key(key: str) -> Optional[str]:
    """None if `key` names a field of RunConfig, else a description with a suggestion."""
    model: type[BaseModel] = RunConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            prefix = ".".join(parts[:i])
            return f"unknown key {part!r}{' in ' + prefix if prefix else ''}{_suggest(part, fields)}"
        annotation = fields[part].annotation
        is_section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if i < len(parts) - 1:
            if not is_section:
                return f"{'.'.join(parts[: i + 1])} is not a section"
            model = annotation
        elif is_section:
            return f"{key} is a section; sweep one of its keys, e.g. {key}.{next(iter(annotation.model_fields))}"
    return None


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _describe(err: dict, root: type[BaseModel]) -> str:
    """A pydantic error as a short sentence, with a suggestion for unknown keys."""
    if err["type"] == "extra_forbidden":
        loc = [p for p in err["loc"] if isinstance(p, str)]
        parent = _model_at(root, loc[:-1])
        return "unknown key" + (_suggest(loc[-1], parent.model_fields) if parent else "")
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] not in ("missing",) and "input" in err and not isinstance(err["input"], dict):
        msg += f" (got {err['input']!r})"
    return msg


def _model_at(root: type[BaseModel], loc: list[str]) -> Optional[type[BaseModel]]:
    model = root
    for part in loc:
        field = model.model_fields.get(part)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def _dotted(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def _where(path: Path, lines: dict[str, int], key: str) -> str:
    """`file:line` for the deepest known prefix of a dotted key, else `file`."""
    parts = key.split(".")
    for i in range(len(parts), 0, -1):
        line = lines.get(".".join(parts[:i]))
        if line is not None:
            return f"{path}:{line}"
    return str(path)


def _key_lines(node: Any, prefix: str = "") -> dict[str, int]:
    """Map dotted key paths to 1-based line numbers from a composed YAML node tree."""
    out: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            out[key] = key_node.start_mark.line + 1
            out.update(_key_lines(value_node, key + "."))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[f"{prefix}{i}"] = item.start_mark.line + 1
            out.update(_key_lines(item, f"{prefix}{i}."))
    return out


def dump_resolved(exp: Experiment) -> str:
    """The validated experiment (after --set) as YAML: what a results folder was made from.

    `launcher` is left out: it says where runs train (this machine, N workers, Slurm), not
    what they compute, so switching launchers keeps a folder's results instead of asking for
    --fresh; `logging` likewise (where the numbers are also sent). Run ids never depend on
    either (they hash run configs only).
    """
    return yaml.safe_dump(exp.config.model_dump(mode="json", exclude={"launcher", "logging"}), sort_keys=False)


