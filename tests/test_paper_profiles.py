"""Each chapter's `paper` profile, executed end to end on stand-ins for the hub's models and data.

No machine here reaches the hub, so these runs resolve every hub id the profiles name to a
tiny local model of the same architecture class and tokenizer kind, and every hub data set to
mirror rows in the hub's schema (`tests/standins/standin_hub.py`). Everything else is the
profile's own values except sizes and step counts, capped (`CAPS`) so that each run takes
seconds of compute: the paper-only code paths (SQuAD's official splits, DistilBERT's inputs,
an already fine-tuned teacher, GPT-NeoX and its padded vocabulary, gradient accumulation,
bf16, iflytek's 119 labels, 6- and 3-layer successors of a 12-layer predecessor) run here.
The numbers mean nothing: the stand-ins' weights are random.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bookrun.chapters import CHAPTERS
from bookrun.params import profile_values
from kdlib.report import VERDICTS

pytestmark = pytest.mark.slow

STANDINS = Path(__file__).parent / "standins"
CAPS = {
    "ch1": {
        "max_train_windows": 64,
        "eval_questions": 64,
        "max_length": 128,  # the profile's 384 (stride 128) makes each step ~3x as costly
        "stride": 32,
        "curve_questions": 32,
        "epochs": 1.0,
        "eval_every": 2,
    },
    "ch2": {
        "train_examples": 64,
        "eval_examples": 64,
        "train_seeds": [0, 1],  # two seeds: its verdicts need a spread
        "epochs": 1.0,
    },
    "ch3": {
        "max_length": 64,
        "steps": 2,
        "gradient_accumulation_steps": 4,
        "heldout_blocks": 4,
        "zero_shot_examples": 4,
        "lambada_examples": 4,
    },
    "ch4": {
        "train_examples": 256,
        "eval_examples": 64,
        "max_length": 64,  # the profile's 128 makes each step ~3x as costly; no code path needs it
        "predecessor_steps": 4,
        "replacing_steps": 4,
        "successor_steps": 2,
        "train_seeds": [0],
    },
}
# Every data set comes from the (stand-in) hub, as on a machine with no mirror, except chapter
# 3's lm-eval tasks: lm-eval's own hub task definitions are not stood in for, so that chapter
# reads the tasks' mirror files (its training and held-out text still come from the hub).
NEEDS_MIRROR = {"ch3"}


@pytest.fixture(scope="module")
def standin_models(shared_data, tmp_path_factory):
    sys.path.insert(0, str(STANDINS))
    try:
        import standin_hub
    finally:
        sys.path.remove(str(STANDINS))
    return standin_hub.build_models(
        tmp_path_factory.mktemp("standin-models"), Path(os.environ["KDLIB_DATA_DIR"])
    )


def run_paper(chapter: str, models: Path, out: Path) -> dict:
    overrides = [arg for name, value in CAPS[chapter].items() for arg in ("-p", name, json.dumps(value))]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(STANDINS), os.environ.get("PYTHONPATH", "")]),
        KDLIB_STANDINS=str(models),
        KDLIB_STANDINS_DATA=os.environ["KDLIB_DATA_DIR"],
        KDLIB_DATA_DIR=os.environ["KDLIB_DATA_DIR"] if chapter in NEEDS_MIRROR else "",
        HF_HUB_OFFLINE="1",  # anything not stood in for fails at once
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bookrun",
            "run",
            chapter,
            "--profile",
            "paper",
            *overrides,
            "--output-dir",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    paper = profile_values(CHAPTERS[chapter], "paper")
    assert metrics["profile"] == "paper"
    for name, value in paper.items():  # the profile's own values, except the capped sizes
        if name not in CAPS[chapter]:
            assert metrics["parameters"][name] == value, name
    for name, value in CAPS[chapter].items():  # each -p override reached the notebook
        assert metrics["parameters"][name] == value, name
    assert metrics["claims"] and all(c["verdict"] in VERDICTS for c in metrics["claims"])
    return metrics


def test_ch1_paper_profile_trains_distilbert_on_the_official_splits(standin_models, tmp_path):
    metrics = run_paper("ch1", standin_models, tmp_path)
    data, results = metrics["data"], metrics["results"]
    assert data["train"] == "official train split" and data["eval"] == "official validation split"
    assert data["train_questions"] > 0 and data["evaluated_questions"] == data["eval_questions"] > 0
    assert set(results["runs"]) == {"student_alone/seed0", "student_distilled/seed0"}
    assert results["curves"], "eval_every steps were asked for"


def test_ch2_paper_profile_distils_from_a_teacher_already_fine_tuned(standin_models, tmp_path):
    metrics = run_paper("ch2", standin_models, tmp_path)
    data, results = metrics["data"], metrics["results"]
    assert data["teacher_train_examples"] == 0  # teacher_steps: 0, the checkpoint as it is
    assert data["eval_split"].startswith("SST-2 validation") and data["eval_examples"] > 0
    strategies = metrics["parameters"]["strategies"]
    assert {f"{s}/seed{k}" for s in strategies for k in (0, 1)} <= set(results["runs"])


def test_ch3_paper_profile_distils_pythia_with_gradient_accumulation(standin_models, tmp_path):
    metrics = run_paper("ch3", standin_models, tmp_path)
    params, data, models = metrics["parameters"], metrics["data"], metrics["results"]["models"]
    assert data["corpus"] == ["monology/pile-uncopyrighted"] and data["heldout_blocks"] == 4
    assert (
        data["rows_per_run"] == params["steps"] * params["batch_size"] * params["gradient_accumulation_steps"]
    )
    assert set(models) == {"student-base", "teacher", *params["runs"]}
    for name, entry in models.items():
        assert set(entry["zero_shot"]) == set(params["zero_shot_tasks"]), name


def test_ch4_paper_profile_compresses_a_12_layer_predecessor_on_iflytek(standin_models, tmp_path):
    metrics = run_paper("ch4", standin_models, tmp_path)
    data, results = metrics["data"], metrics["results"]
    assert data["classes"] == 119
    assert results["predecessor"]["layers"] == 12
    for depth in (6, 3):
        assert any(name.endswith(f"/L{depth}") for name in results["methods"]), depth
