"""A chapter's parameters: read from its parameters cell, set by a profile, checked up front.

papermill alone only warns about a parameter the notebook does not declare and never checks a
type or a range. Here the parameters cell (annotated assignments with a comment each) names,
documents and sets the default of every parameter: it is the one place a default is written.
The chapter's configuration dataclass declares the same names without defaults and checks
types and ranges; a profile file sets only what differs from the defaults. All of it runs
before a kernel starts.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import tempfile
from pathlib import Path
from typing import Any

import jupytext
import papermill
import yaml

from bookrun.chapters import PROFILES, ROOT, Chapter
from kdlib.config import ConfigError, from_mapping


def declared_parameters(chapter: Chapter) -> dict[str, dict[str, Any]]:
    """name -> {type, default, help} from the chapter source's `parameters` cell."""
    return _declared(chapter.source, chapter.source.stat().st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _declared(source: Path, modified: int) -> dict[str, dict[str, Any]]:
    with tempfile.TemporaryDirectory() as scratch:
        notebook = Path(scratch) / f"{source.stem}.ipynb"
        jupytext.write(jupytext.read(source), notebook)
        inspected = papermill.inspect_notebook(str(notebook))
    found = {
        name: {"type": p["inferred_type_name"], "default": p["default"], "help": p["help"]}
        for name, p in inspected.items()
    }
    if not found:
        raise ConfigError(f"{source} has no cell tagged 'parameters'.")
    return found


def chapter_defaults(chapter: Chapter) -> dict[str, Any]:
    """name -> default value, as the chapter's parameters cell writes it."""
    return {name: ast.literal_eval(info["default"]) for name, info in declared_parameters(chapter).items()}


def chapter_config(chapter: Chapter, **values: Any) -> Any:
    """The chapter's configuration: its parameters cell's defaults, then `values`; checked."""
    return from_mapping(chapter.config_class(), values, defaults=chapter_defaults(chapter))


def parse_value(text: str) -> Any:
    """A command-line value as YAML reads it: 4 -> int, 4.0 -> float, [1, 2] -> list, a -> str."""
    return yaml.safe_load(text) if text.strip() else ""


def profile_values(chapter: Chapter, profile: str) -> dict[str, Any]:
    if profile not in PROFILES:
        raise ConfigError(f"profile = {profile!r} is not allowed: choose one of {list(PROFILES)}.")
    path = chapter.params_file(profile)
    if not path.is_file():
        raise ConfigError(f"chapter {chapter.key} has no {profile} profile yet ({path.relative_to(ROOT)}).")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must be a mapping of parameter names to values.")
    return values


def resolve(
    chapter: Chapter, profile: str, overrides: dict[str, Any] | None = None, output_dir: Path | None = None
) -> dict[str, Any]:
    """The parameters a run will get: profile file, then overrides; validated or ConfigError.

    Returns the values the profile file and the overrides set (what papermill injects); every
    other parameter keeps the notebook's default.
    """
    declared = declared_parameters(chapter)
    values = {"profile": profile, **profile_values(chapter, profile), **(overrides or {})}
    if output_dir is not None:
        values["output_dir"] = str(output_dir)
    unknown = sorted(set(values) - set(declared))
    if unknown:
        raise ConfigError(
            f"unknown parameter(s) {unknown} for chapter {chapter.key}; its parameters are: "
            f"{sorted(declared)} (list them with `python -m bookrun params {chapter.key}`)."
        )
    config = chapter_config(chapter, **values)
    # the config may normalise values (ints given for floats): inject what it accepted
    return {name: getattr(config, name) for name in values}


def describe(chapter: Chapter) -> str:
    """A table of the chapter's parameters: name, type, default, meaning, per-profile values."""
    declared = declared_parameters(chapter)
    profiles = {p: profile_values(chapter, p) for p in PROFILES if chapter.params_file(p).exists()}
    lines = [f"Parameters of {chapter.key} ({chapter.source.name}):", ""]
    for name, info in declared.items():
        lines.append(f"  {name}: {info['type']} = {info['default']}")
        if info["help"]:
            lines.append(f"      {info['help']}")
        for profile, values in profiles.items():
            if name in values:
                lines.append(f"      {profile}: {values[name]!r}")
    return "\n".join(lines)


def check_consistency(chapter: Chapter) -> None:
    """The parameters cell and the configuration class declare the same names, and the class
    sets no default of its own (the cell's are the only ones)."""
    declared = declared_parameters(chapter)
    cls = chapter.config_class()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if set(declared) != set(fields):
        raise ConfigError(
            f"{chapter.source.name} declares {sorted(set(declared) - set(fields))} that "
            f"{cls.__name__} lacks, and lacks {sorted(set(fields) - set(declared))}."
        )
    own = [
        name
        for name, f in fields.items()
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    ]
    if own:
        raise ConfigError(
            f"{cls.__name__} sets defaults for {own}: the parameters cell of {chapter.source.name} "
            "is the one place for a default."
        )
