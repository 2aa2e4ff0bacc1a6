"""The fine-tuned teachers a run names, trained here first when this machine has none.

Chapter 1's default teacher (`minilm-l6-squad`) is a checkpoint fine-tuned once and shared in
$KDLIB_MODELS_DIR. A reader without that folder would otherwise get, at chapter 1, an error
telling them to run a 40-minute command by hand: instead the build says what is missing and how
long it will take, trains it with its recorded recipe (`experiments.ch1_teacher`, the same as
`make teacher`) into the cache with its sha256 stamp, and goes on. Later runs find it there.

A model named by its hub id is looked up before the first kernel starts (`check_hub_models`), so
that a run which needs the hub and cannot reach it stops in seconds, saying which model, rather
than after a kernel's start and the chapter's first cells.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bookrun.chapters import Chapter
from bookrun.params import chapter_config
from kdlib.registry import FINE_TUNED, REGISTRY, ModelNotAvailableError, resolve_model

EXPECTED_MINUTES = {"minilm-l6-squad": 40}
"""Measured on 2 CPU cores with the recipe's 1,000 steps (`experiments.ch1_teacher`)."""


def named_teachers(runs: Iterable[tuple[Chapter, dict[str, Any]]]) -> list[str]:
    """The fine-tuned checkpoints (`kdlib.registry.FINE_TUNED`) that these runs name: each run is
    a chapter and the parameters its profile and overrides set (the rest keep their defaults)."""
    names = set()
    for chapter, parameters in runs:
        config = chapter_config(chapter, **parameters)
        names |= {value for value in vars(config).values() if isinstance(value, str) and value in FINE_TUNED}
    return sorted(names)


def check_hub_models(runs: Iterable[tuple[Chapter, dict[str, Any]]]) -> None:
    """Raise `kdlib.hub.HubUnavailableError` (or `ModelNotAvailableError` for a folder that is
    not there) if a model the runs name must come from the hub and the hub does not answer.
    Registry names, fine-tuned teachers and empty values are left to the run: they never need
    the hub."""
    for chapter, parameters in runs:
        config = chapter_config(chapter, **parameters)
        for name in chapter.models:
            value = getattr(config, name)  # "" names no model (chapter 3: a cut of the teacher)
            if value and value not in REGISTRY and value not in FINE_TUNED:
                resolve_model(value)


def missing_teachers(runs: Iterable[tuple[Chapter, dict[str, Any]]]) -> list[str]:
    """Those of `named_teachers` that neither $KDLIB_MODELS_DIR nor the cache holds."""
    missing = []
    for name in named_teachers(runs):
        try:
            resolve_model(name)
        except ModelNotAvailableError:
            missing.append(name)
    return missing


def ensure_teachers(
    runs: Iterable[tuple[Chapter, dict[str, Any]]], recipe: dict[str, Any] | None = None
) -> list[Path]:
    """Train every missing teacher the runs name (`recipe`: overrides of its recorded recipe,
    for tests); return where each was saved. Says what it does before it starts."""
    from experiments.ch1_teacher import TeacherRecipe, train_teacher
    from kdlib.config import from_mapping

    trained = []
    for name in missing_teachers(runs):
        settings = from_mapping(TeacherRecipe, recipe or {})
        minutes = EXPECTED_MINUTES[name] * settings.max_steps / TeacherRecipe.max_steps
        expected = f"about {minutes:.0f} min" if minutes >= 1 else "under a minute"
        print(
            f"teacher {name!r} is neither in KDLIB_MODELS_DIR nor in the cache: training it now with its "
            f"recorded recipe ({settings.max_steps} steps, {expected} on 2 CPU cores; "
            f"`make teacher` does the same). It is saved to {settings.target()} and reused from then on.",
            flush=True,
        )
        started = time.perf_counter()
        path = train_teacher(settings)
        print(f"teacher {name!r} trained in {time.perf_counter() - started:.0f} s -> {path}", flush=True)
        trained.append(path)
    return trained
