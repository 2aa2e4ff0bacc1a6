"""The book's orchestration: parameters declared, validated before a kernel starts, listed."""

import subprocess
import sys
import time

import pytest

from bookrun.chapters import CHAPTERS, PROFILES
from bookrun.params import check_consistency, declared_parameters, describe, parse_value, resolve
from kdlib.config import ConfigError

CH1 = CHAPTERS["ch1"]


@pytest.mark.parametrize("key", list(CHAPTERS))
def test_parameters_cell_matches_the_config_class(key):
    check_consistency(CHAPTERS[key])


@pytest.mark.parametrize("key", list(CHAPTERS))
def test_the_default_profile_is_the_parameters_cell(key):
    from bookrun.params import profile_values

    assert profile_values(CHAPTERS[key], "default") == {}  # a default is written in one place only


@pytest.mark.parametrize(
    ("key", "profile"),
    [(k, p) for k in CHAPTERS for p in PROFILES if CHAPTERS[k].params_file(p).exists()],
)
def test_every_profile_file_validates(key, profile):
    values = resolve(CHAPTERS[key], profile)
    assert values["profile"] == profile


def test_parameters_are_documented():
    declared = declared_parameters(CH1)
    assert declared["temperature"]["type"] == "float"
    assert all(info["help"] for info in declared.values()), "every parameter needs a comment"
    text = describe(CH1)
    assert "temperature: float = 2.0" in text and "softmax temperature" in text


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"temprature": 4}, "unknown parameter"),
        ({"temperature": 0}, "temperature"),
        ({"alpha_ce": 2}, "alpha_ce"),
        ({"batch_size": 0}, "batch_size"),
        ({"stride": 500}, "max_length"),
        ({"batch_size": "eight"}, "batch_size.*expected int"),
    ],
)
def test_bad_overrides_stop_before_any_work(overrides, message):
    with pytest.raises(ConfigError, match=message):
        resolve(CH1, "default", overrides)


def test_cli_values_are_read_as_yaml():
    assert parse_value("4") == 4
    assert parse_value("2.5") == 2.5
    assert parse_value("[1, 2]") == [1, 2]
    assert parse_value("minilm-l3") == "minilm-l3"


@pytest.mark.slow  # a fresh interpreter per call
def test_cli_refuses_bad_parameter_in_seconds_with_exit_code_2(tmp_path):
    started = time.perf_counter()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bookrun",
            "run",
            "ch1",
            "--profile",
            "smoke",
            "-p",
            "temperature",
            "-1",
            "--output-dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "temperature = -1.0 is out of range" in result.stderr
    assert not (tmp_path / "out").exists()
    assert time.perf_counter() - started < 30


def fake_metrics(profile="default"):
    return {
        "profile": profile,
        "parameters": {"temperature": 2.0, "train_seeds": [0, 1, 2], "max_train_windows": 2400},
        "claims": [
            {
                "claim": "KD helps | a lot",
                "paper": "+1.1 F1",
                "replication": None,
                "measured": "+0.5 F1",
                "verdict": "inconclusive",
            }
        ],
        "wall_time_s": 570.0,
        "peak_memory_mb": 3400.0,
        "hardware": {"processor": "Test CPU", "torch_threads": 2, "gpu": None},
        "versions": {"python": "3.11.7", "torch": "2.13.0"},
    }


def test_results_page_has_one_row_per_claim_and_a_row_per_missing_chapter():
    from bookrun.results import results_page

    page = results_page([(CH1, fake_metrics()), (CHAPTERS["ch2"], None)])
    title = "Distilling distilled transformers: DistilBERT's second step on SQuAD"
    assert f"## [{title}](ch1_distilbert_squad.ipynb)" in page
    assert (
        "| KD helps \\| a lot | **inconclusive** | this build's default run: too small to decide | "
        "+0.5 F1 | +1.1 F1 | — |"
    ) in page
    assert "(ch2_layer_distillation.ipynb)\n\nNot run in this build." in page
    assert (
        "| {doc}`ch1 <ch1_distilbert_squad>` | this build | default | 9.5 min | 3.3 GB | "
        "Test CPU, 2 threads, no GPU |"
        in page
    )


def test_results_page_takes_the_verdict_from_the_reference_record_and_shows_both_runs():
    from bookrun.results import results_page

    reference = fake_metrics("reference")
    reference["claims"][0] |= {"verdict": "reproduced", "measured": "+1.3 F1"}
    reference["record"] = {"commit": "abcdef0123" + "0" * 30, "date": "2026-12-01"}
    page = results_page([(CH1, fake_metrics())], {"ch1": reference})
    assert (
        "| KD helps \\| a lot | **reproduced** | reference run, commit `abcdef0123` (this build's default "
        "run: inconclusive) | +1.3 F1 | +1.1 F1 | — |"
    ) in page
    assert "| reference, 2026-12-01 | reference | 9.5 min |" in page
    assert "| this build | default | 9.5 min |" in page


def test_provenance_box_goes_above_setup_and_names_the_profile_values(tmp_path):
    import jupytext
    import nbformat

    from bookrun.results import add_provenance

    path = tmp_path / "ch1.ipynb"
    jupytext.write(jupytext.read(CH1.source), path)
    add_provenance(path, CH1, fake_metrics("smoke"))
    first = next(c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "markdown")
    box, setup = first.source.index("Provenance of this page"), first.source.index("## Setup")
    assert first.source.index("## Overview") < box < setup
    assert "`max_train_windows=2400`" in first.source  # set by the smoke profile file
    assert "9.5 min" in first.source and "torch 2.13.0" in first.source and "no GPU" in first.source
    jupytext.write(jupytext.read(CH1.source), path)
    add_provenance(path, CH1, fake_metrics("default"))  # the default profile sets nothing itself
    first = next(c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "markdown")
    assert "profile** `default`, the parameters cell's defaults" in first.source


def test_workshop_notebooks_are_runnable_ipynb_with_parameters_first_and_no_outputs(tmp_path):
    import nbformat

    from bookrun.notebooks import write_notebooks

    paths = write_notebooks(list(CHAPTERS.values()), "smoke", tmp_path)
    assert [p.name for p in paths] == [f"{c.stem}.ipynb" for c in CHAPTERS.values()]
    for path in paths:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        code = [c for c in notebook.cells if c.cell_type == "code"]
        assert code[0].metadata["tags"] == ["parameters"]
        assert code[1].metadata["tags"] == ["injected-parameters"] and 'profile = "smoke"' in code[1].source
        assert all(not c.outputs and c.execution_count is None for c in code)
        assert notebook.metadata["kernelspec"]["name"] == "python3"


def test_the_fine_tuned_teachers_a_build_needs_are_the_ones_its_parameters_name():
    from bookrun.teachers import named_teachers

    ch3 = CHAPTERS["ch3"]
    assert named_teachers([(CH1, resolve(CH1, "default"))]) == ["minilm-l6-squad"]  # the cell's default
    assert named_teachers([(CH1, resolve(CH1, "paper"))]) == []  # a hub id: nothing to train here
    assert named_teachers([(CH1, {"teacher": "minilm-l6"})]) == []
    assert named_teachers([(ch3, {}), (CH1, {}), (CH1, {"profile": "smoke"})]) == ["minilm-l6-squad"]


def test_only_hub_models_are_looked_up_before_a_run(monkeypatch):
    """Offline (as the tests run), every profile but `paper` names no model the hub must give,
    an empty model (chapter 3's student: a cut of the teacher) included; each paper profile's
    first hub model stops it before a kernel starts, named in the error."""
    import kdlib.registry
    from bookrun.teachers import check_hub_models
    from kdlib.hub import HubUnavailableError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # registry names resolve without converting anything here: none may reach resolve_model
    looked_up = []
    monkeypatch.setattr("bookrun.teachers.resolve_model", lambda name: looked_up.append(name) or name)
    for chapter in CHAPTERS.values():
        for profile in ("smoke", "default", "reference"):
            if chapter.params_file(profile).exists():
                check_hub_models([(chapter, resolve(chapter, profile))])
    assert looked_up == []
    monkeypatch.setattr("bookrun.teachers.resolve_model", kdlib.registry.resolve_model)
    for chapter in CHAPTERS.values():
        paper = resolve(chapter, "paper")
        first = next(paper[name] for name in chapter.models if paper.get(name))
        with pytest.raises(HubUnavailableError, match=f"model '{first}'"):
            check_hub_models([(chapter, paper)])


@pytest.mark.slow
def test_a_chapters_kernel_starts_with_the_imports_frozen():
    """`execute` starts each kernel with `kernel.ARGUMENTS`: the extension loads, so the kernel
    has imported kdlib's trainer and frozen the objects that made, before the first cell."""
    from jupyter_client.manager import start_new_kernel

    from bookrun import kernel

    manager, client = start_new_kernel(kernel_name="python3", extra_arguments=kernel.ARGUMENTS)
    printed: list[str] = []
    try:
        reply = client.execute_interactive(
            "import gc, sys; print('kdlib.trainer' in sys.modules, gc.get_freeze_count() > 100_000)",
            output_hook=lambda msg: printed.append(msg["content"].get("text", "")),
            timeout=120,
        )
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    assert reply["content"]["status"] == "ok"
    assert "".join(printed).split() == ["True", "True"]
