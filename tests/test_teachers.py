"""A fine-tuned teacher the run names but this machine lacks is trained first, not refused."""

import json

import pytest

from bookrun.chapters import CHAPTERS
from bookrun.params import resolve
from bookrun.teachers import ensure_teachers, missing_teachers
from kdlib.registry import STAMP, ModelNotAvailableError, resolve_model

pytestmark = pytest.mark.slow  # fine-tunes the real MiniLM-L6 for two steps


def test_a_missing_teacher_is_trained_with_its_recipe_and_found_from_then_on(
    shared_data, tmp_path, monkeypatch, capsys
):
    monkeypatch.delenv("KDLIB_MODELS_DIR")
    monkeypatch.setenv("KDLIB_CACHE_DIR", str(tmp_path))
    runs = [(CHAPTERS["ch1"], resolve(CHAPTERS["ch1"], "default"))]
    assert missing_teachers(runs) == ["minilm-l6-squad"]
    with pytest.raises(ModelNotAvailableError):
        resolve_model("minilm-l6-squad")

    [path] = ensure_teachers(runs, recipe={"max_steps": 2, "batch_size": 2})

    said = capsys.readouterr().out
    assert "'minilm-l6-squad' is neither in KDLIB_MODELS_DIR nor in the cache" in said
    assert "2 steps, under a minute" in said  # what it does and how long, before it starts
    assert path == tmp_path / "teachers" / "minilm-l6-squad"
    assert resolve_model("minilm-l6-squad") == str(path)  # found now, its sha256 stamp checked
    stamp = json.loads((path / STAMP).read_text())
    assert stamp["recipe"]["max_steps"] == 2 and stamp["sha256"]
    assert missing_teachers(runs) == [] and ensure_teachers(runs) == []  # trained once only
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no scratch left behind
