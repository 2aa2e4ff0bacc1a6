"""The chapters the book executes, and the configuration class that validates each one."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "book"
PROFILES = ("smoke", "default", "reference", "paper")
"""smoke: the tests; default: the published build; reference: what decides the claims (run
outside CI, its record committed: `bookrun.records`); paper: the papers' setting, for a GPU."""


@dataclass(frozen=True)
class Chapter:
    key: str
    stem: str
    config: str
    """`module:Class` of the dataclass whose fields are the chapter's parameters."""
    models: tuple[str, ...] = ()
    """The parameters that name a model (a registry name, a folder or a hub id)."""

    @property
    def source(self) -> Path:
        return BOOK / f"{self.stem}.md"

    def params_file(self, profile: str) -> Path:
        return BOOK / "params" / self.key / f"{profile}.yml"

    def config_class(self) -> type:
        module, name = self.config.split(":")
        return getattr(importlib.import_module(module), name)


CHAPTERS: dict[str, Chapter] = {
    c.key: c
    for c in (
        Chapter(
            "ch1",
            "ch1_distilbert_squad",
            "experiments.ch1_distilbert_squad:SquadDistillationConfig",
            ("teacher", "student"),
        ),
        Chapter(
            "ch2",
            "ch2_layer_distillation",
            "experiments.ch2_layer_distillation:LayerExperimentConfig",
            ("teacher", "student"),
        ),
        Chapter(
            "ch3",
            "ch3_distilpythia",
            "experiments.ch3_distilpythia:LMExperimentConfig",
            ("teacher", "student"),
        ),
        Chapter("ch4", "ch4_theseus", "experiments.ch4_theseus:TheseusExperimentConfig", ("predecessor",)),
    )
}


def get_chapter(key: str) -> Chapter:
    if key not in CHAPTERS:
        raise SystemExit(f"unknown chapter {key!r}; chapters are: {', '.join(CHAPTERS)}.")
    return CHAPTERS[key]
