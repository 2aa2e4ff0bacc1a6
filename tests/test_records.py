"""Reference records: what is committed is complete, matches its profile, agrees with itself,
and says when the code that made it has changed; `bookrun reference` writes one whole or not
at all."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import shutil
import subprocess

import pytest

from bookrun import reach, records
from bookrun.chapters import CHAPTERS, ROOT
from bookrun.params import chapter_config, profile_values
from experiments import ch1_distilbert_squad, ch2_layer_distillation, ch3_distilpythia, ch4_theseus
from kdlib.config import ConfigError
from kdlib.report import versions

CHECKS = {
    "ch1": ch1_distilbert_squad.check_record,
    "ch2": ch2_layer_distillation.check_record,
    "ch3": ch3_distilpythia.check_record,
    "ch4": ch4_theseus.check_record,
}
"""Each chapter's own consistency check of its record."""
COMMITTED = [c.key for c in CHAPTERS.values() if records.read_record(c) is not None]


@pytest.mark.parametrize("key", COMMITTED)
def test_committed_record_is_complete_matches_its_profile_and_agrees_with_itself(key):
    chapter = CHAPTERS[key]
    record = records.read_record(chapter)
    assert record["chapter"] == key and record["profile"] == "reference"
    assert re.fullmatch(r"[0-9a-f]{40}", record["record"]["commit"])
    assert record["commit"] == record["record"]["commit"]
    assert not record["record"]["uncommitted_changes"]
    assert record["record"]["fingerprint"]["files"] and record["wall_time_s"] > 0
    assert {"processor", "torch_threads"} <= set(record["hardware"])
    assert records.parameter_drift(chapter, record) == {}  # the profile file still gives these values
    assert CHECKS[key](record) == []
    size = sum(p.stat().st_size for p in records.record_dir(chapter).rglob("*") if p.is_file())
    assert size <= records.MAX_RECORD_BYTES
    assert sorted(p.name for p in records.record_dir(chapter).iterdir()) == sorted(
        n for n in records.KEPT if (records.record_dir(chapter) / n).exists()
    )


def test_the_fingerprint_covers_the_chapter_its_experiment_and_the_kdlib_modules_it_reaches():
    files = {str(p.relative_to(ROOT)) for p in records.decisive_files(CHAPTERS["ch1"])}
    assert {
        "book/ch1_distilbert_squad.md",
        "book/params/ch1/reference.yml",
        "book/experiments/ch1_distilbert_squad.py",
        "kdlib/losses.py",  # imported by the chapter's text
        "kdlib/trainer.py",  # by the experiment module
        "kdlib/qa.py",  # `from kdlib import qa`
    } <= files
    assert "kdlib/theseus.py" not in files and "kdlib/zeroshot.py" not in files  # other chapters'


def fresh_record():
    chapter = CHAPTERS["ch1"]
    return {
        "profile": "reference",
        "parameters": dataclasses.asdict(
            chapter_config(chapter, **profile_values(chapter, "reference"), profile="reference")
        ),
        "hardware": {"processor": "Test CPU", "torch_threads": 2, "gpu": None},
        "wall_time_s": 5400.0,
        "peak_memory_mb": 4096.0,
        "record": {
            "commit": "0" * 40,
            "uncommitted_changes": False,
            "date": "2026-12-01",
            "fingerprint": records.fingerprint(chapter, versions()),
        },
    }


def test_staleness_names_each_changed_input():
    chapter, record = CHAPTERS["ch1"], fresh_record()
    assert records.staleness(chapter, record, versions()) == []
    stale = copy.deepcopy(record)
    stale["record"]["fingerprint"]["files"]["kdlib/losses.py"] = "0" * 64
    stale["record"]["fingerprint"]["files"]["kdlib/old_module.py"] = "0" * 64
    stale["record"]["fingerprint"]["versions"]["torch"] = "2.0.0"
    reasons = records.staleness(chapter, stale, versions())
    assert reasons == [
        "`kdlib/losses.py` changed",
        "`kdlib/old_module.py` is gone",
        f"torch 2.0.0 -> {versions()['torch']}",
    ]


def test_records_before_the_definitions_scheme_are_judged_file_by_file():
    chapter, record = CHAPTERS["ch1"], fresh_record()
    record["record"]["fingerprint"] = records._whole_files(chapter, versions())
    assert "scheme" not in record["record"]["fingerprint"]
    assert records.staleness(chapter, record, versions()) == []
    record["record"]["fingerprint"]["files"]["kdlib/stats.py"] = "0" * 64
    assert records.staleness(chapter, record, versions()) == ["`kdlib/stats.py` changed"]


def project_copy(tmp_path, key="ch1"):
    """The files that decide a chapter's numbers, copied under `tmp_path` as a project root."""
    ignore = shutil.ignore_patterns("__pycache__")
    for folder in ("kdlib", "book/experiments", "book/params"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=ignore)
    source = CHAPTERS[key].source.relative_to(ROOT)
    shutil.copy(ROOT / source, tmp_path / source)
    return tmp_path / source


def edit_prose_then_code(text_file, chapter, record, root):
    """(staleness after a prose edit, staleness after a code-cell edit) of `record` at `root`."""
    text = text_file.read_text()
    text_file.write_text(text.replace("\n## ", "\nA new sentence of prose.\n\n## ", 1))
    after_prose = records.staleness(chapter, record, versions(), root)
    text_file.write_text(text + "\n```{code-cell} ipython3\nx = 1\n```\n")
    return after_prose, records.staleness(chapter, record, versions(), root)


def test_prose_leaves_a_record_fresh_and_a_code_cell_does_not(tmp_path):
    chapter, record = CHAPTERS["ch1"], fresh_record()
    text_file = project_copy(tmp_path)
    record["record"]["fingerprint"] = records.fingerprint(chapter, versions(), tmp_path)
    assert records.staleness(chapter, record, versions(), tmp_path) == []
    after_prose, after_code = edit_prose_then_code(text_file, chapter, record, tmp_path)
    assert after_prose == []
    assert after_code == ["the code cells of `book/ch1_distilbert_squad.md` changed"]


def git(root, *args):
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root, check=True, capture_output=True
    )


def test_a_record_of_the_definitions_scheme_is_refingerprinted_from_its_commit(tmp_path):
    """Its chapter text was hashed whole; the commit it names gives its code cells' hash, once
    that commit's files are shown to give the recorded fingerprint."""
    chapter, record = CHAPTERS["ch1"], fresh_record()
    text_file = project_copy(tmp_path)
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "the run's commit")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout
    record["record"]["commit"] = commit.strip()
    record["record"]["fingerprint"] = records.fingerprint(
        chapter, versions(), tmp_path, records.PREVIOUS_SCHEME
    )
    assert record["record"]["fingerprint"]["scheme"] == "definitions"
    after_prose, after_code = edit_prose_then_code(text_file, chapter, record, tmp_path)
    assert after_prose == []
    assert after_code == ["the code cells of `book/ch1_distilbert_squad.md` changed"]

    # not shown to come from its commit: judged as recorded, the whole text
    for meta in ({"commit": "f" * 40}, {"uncommitted_changes": True}):
        unproven = copy.deepcopy(record)
        unproven["record"].update(meta)
        assert edit_prose_then_code(text_file, chapter, unproven, tmp_path)[0] == [
            "`book/ch1_distilbert_squad.md` changed"
        ]
    tampered = copy.deepcopy(record)
    tampered["record"]["fingerprint"]["files"]["kdlib/losses.py"] = "0" * 64
    assert (
        "`book/ch1_distilbert_squad.md` changed"
        in edit_prose_then_code(text_file, chapter, tampered, tmp_path)[0]
    )


LIBRARY = {
    "kdlib/__init__.py": "",
    "kdlib/a.py": (
        "from kdlib.c import helper\n\n\n"
        "def used():\n    return helper() + RATE\n\n\n"
        "def unused():\n    return 0\n\n\n"
        "RATE = 2\n"
    ),
    "kdlib/b.py": "from kdlib.a import used as reexported\n\nSCALE = 3\nOTHER = 4\n",
    "kdlib/c.py": "def helper():\n    return 1\n\n\ndef spare():\n    return 5\n",
    "kdlib/d.py": "def never():\n    return 6\n",
}
CHAPTER_CODE = "from kdlib import b\nfrom kdlib.b import reexported\n\nprint(reexported(), b.SCALE)\n"


def library(tmp_path, **edits):
    for name, text in {**LIBRARY, **edits}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return reach.reached_digests([("chapter", CHAPTER_CODE)], tmp_path)


def test_reach_follows_names_attributes_imports_and_re_exports(tmp_path):
    library(tmp_path)
    found, _ = reach.reached([("chapter", CHAPTER_CODE)], tmp_path)
    assert found == {
        "kdlib.a": {"used", "RATE"},  # through b's re-export; RATE from used's body
        "kdlib.b": {"reexported", "SCALE"},  # `b.SCALE`, not OTHER
        "kdlib.c": {"helper"},  # imported into a, called by used
    }  # kdlib.d: never imported; kdlib.a.unused, kdlib.c.spare: never named


def test_the_digest_moves_with_reached_code_only(tmp_path):
    base = library(tmp_path)
    assert set(base) == {"kdlib/a.py", "kdlib/b.py", "kdlib/c.py"}
    added = library(tmp_path, **{"kdlib/c.py": LIBRARY["kdlib/c.py"] + "\n\ndef new():\n    return 7\n"})
    assert added == base  # a function another chapter added
    assert library(tmp_path, **{"kdlib/a.py": LIBRARY["kdlib/a.py"].replace("return 0", "return 9")}) == base
    moved = library(tmp_path, **{"kdlib/c.py": LIBRARY["kdlib/c.py"].replace("return 1", "return 8")})
    assert moved != base and {k for k in base if moved[k] != base[k]} == {"kdlib/c.py"}
    rate = library(tmp_path, **{"kdlib/a.py": LIBRARY["kdlib/a.py"].replace("RATE = 2", "RATE = 5")})
    assert {k for k in base if rate[k] != base[k]} == {"kdlib/a.py"}


def test_code_cells_are_the_python_of_a_myst_notebook():
    text = (
        "# Title\n\n```{code-cell} ipython3\n:tags: [parameters]\n\nx = 1\n```\n\nProse with `y = 2`.\n\n"
        "```{code-cell} ipython3\n---\nmystnb:\n  figure:\n    name: f\n---\n%matplotlib inline\nz = x\n```\n"
        "```python\nnot_a_cell = 3\n```\n"
    )
    assert reach.code_cells(text).split() == ["x", "=", "1", "z", "=", "x"]


def test_the_page_note_says_what_the_run_was_and_whether_it_is_stale(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "RECORDS", tmp_path)
    record, note = records.reference_run("ch1")
    assert record is None and "No reference run is recorded" in note and "make reference CH=ch1" in note
    (tmp_path / "ch1").mkdir()
    fresh = fresh_record()
    (tmp_path / "ch1" / "metrics.json").write_text(json.dumps(fresh))
    record, note = records.reference_run("ch1")
    assert record == fresh
    assert "commit `0000000000`, 2026-12-01, Test CPU (2 threads, no GPU), 90 minutes" in note
    assert "stale" not in note
    fresh["record"]["fingerprint"]["files"]["book/ch1_distilbert_squad.md"] = "0" * 64
    (tmp_path / "ch1" / "metrics.json").write_text(json.dumps(fresh))
    _, note = records.reference_run("ch1")
    assert "**This record is stale.**" in note and "`book/ch1_distilbert_squad.md` changed" in note


def test_a_record_whose_parameters_left_its_profile_is_caught():
    record = fresh_record()
    assert records.parameter_drift(CHAPTERS["ch1"], record) == {}
    record["parameters"]["eval_questions"] = 400
    assert records.parameter_drift(CHAPTERS["ch1"], record) == {"eval_questions": (400, 0)}
    # against a run's own parameters (profile values and overrides, as papermill injects them)
    run = {**profile_values(CHAPTERS["ch1"], "reference"), "profile": "reference", "output_dir": "../x"}
    assert records.parameter_drift(CHAPTERS["ch1"], record, run) == {"eval_questions": (400, 0)}
    assert records.parameter_drift(CHAPTERS["ch1"], record, {**run, "epochs": 3.0}) == {
        "eval_questions": (400, 0),
        "epochs": (record["parameters"]["epochs"], 3.0),
    }


def test_a_chapter_without_a_reference_profile_is_refused_before_any_work():
    new_chapter = dataclasses.replace(CHAPTERS["ch3"], key="ch9")  # no book/params/ch9/ yet
    with pytest.raises(
        ConfigError, match=r"ch9 has no reference profile yet \(book/params/ch9/reference.yml\)"
    ):
        records.check_runnable(new_chapter, allow_dirty=True)


def fake_run(write_everything: bool):
    def run_chapter(chapter, profile, overrides, output_dir):
        assert profile == "reference" and overrides == {}
        (output_dir / "predictions").mkdir(parents=True)
        (output_dir / "predictions" / "teacher.json").write_text("{}")
        (output_dir / "runs" / "student_alone").mkdir(parents=True)
        (output_dir / "ch1_distilbert_squad.ipynb").write_text("{}")
        if not write_everything:
            raise RuntimeError("a cell failed")
        metrics = {"chapter": "ch1", "profile": profile, "versions": versions(), "wall_time_s": 1.0}
        (output_dir / "metrics.json").write_text(json.dumps(metrics))

    return run_chapter


def test_a_reference_run_keeps_the_record_only_and_names_its_commit(tmp_path, monkeypatch):
    import bookrun.execute

    monkeypatch.setattr(records, "RECORDS", tmp_path)
    monkeypatch.setattr(bookrun.execute, "run_chapter", fake_run(write_everything=True))
    target = records.run_reference(CHAPTERS["ch1"], allow_dirty=True)
    assert target == tmp_path / "ch1"
    assert sorted(p.name for p in target.iterdir()) == ["metrics.json", "predictions"]
    written = json.loads((target / "metrics.json").read_text())
    meta = written["record"]
    assert meta["commit"] == records._git("rev-parse", "HEAD") and meta["command"] == "make reference CH=ch1"
    assert written["commit"] == meta["commit"]
    assert meta["fingerprint"] == records.fingerprint(CHAPTERS["ch1"], versions())


def test_a_failed_reference_run_leaves_the_old_record_and_nothing_else(tmp_path, monkeypatch):
    import bookrun.execute

    monkeypatch.setattr(records, "RECORDS", tmp_path)
    (tmp_path / "ch1").mkdir()
    (tmp_path / "ch1" / "metrics.json").write_text('{"old": true}')
    monkeypatch.setattr(bookrun.execute, "run_chapter", fake_run(write_everything=False))
    with pytest.raises(RuntimeError, match="a cell failed"):
        records.run_reference(CHAPTERS["ch1"], allow_dirty=True)
    assert [p.name for p in tmp_path.iterdir()] == ["ch1"]
    assert json.loads((tmp_path / "ch1" / "metrics.json").read_text()) == {"old": True}
