"""Each chapter, executed at the smoke profile, writes the numbers its pages claim to show."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from bookrun.chapters import CHAPTERS
from bookrun.params import chapter_config, profile_values
from experiments import ch2_layer_distillation as ch2
from experiments import ch3_distilpythia as ch3
from kdlib.report import VERDICTS

pytestmark = pytest.mark.slow  # real models, the smoke book or subprocesses


@pytest.fixture(scope="module")
def ch1_metrics(smoke_book):
    """Chapter 1 as the smoke book ran it: its output folder (predictions) and metrics. (It used
    to run again on its own through the CLI, to show that an override reaches the notebook; the
    paper-profile tests pass their overrides through the same CLI and check that.)"""
    out = smoke_book / "outputs" / "smoke" / "ch1"
    return out, json.loads((out / "metrics.json").read_text())


def test_ch1_records_parameters_and_provenance(ch1_metrics):
    _, metrics = ch1_metrics
    assert metrics["chapter"] == "ch1" and metrics["profile"] == "smoke"
    smoke = profile_values(CHAPTERS["ch1"], "smoke")
    assert smoke["max_train_windows"] == 24  # what the assertions below are sized for
    assert {name: metrics["parameters"][name] for name in smoke} == smoke  # the profile's values
    assert metrics["wall_time_s"] > 0 and metrics["peak_memory_mb"] > 0
    assert {"torch", "transformers", "python"} <= set(metrics["versions"])
    assert metrics["hardware"]["cpu_count"] >= 1
    assert metrics["data"]["eval_articles"] == list(range(38, 48))
    assert not set(metrics["data"]["train_articles"]) & set(metrics["data"]["eval_articles"])


RUNS = [
    "teacher",
    "student_alone/seed0",
    "student_distilled/seed0",
    "student_alone/seed1",
    "student_distilled/seed1",
]


def test_ch1_scores_every_model_on_the_same_questions(ch1_metrics):
    out, metrics = ch1_metrics
    results = metrics["results"]
    scored = {"teacher": results["teacher"], **results["runs"]}
    assert sorted(scored) == sorted(RUNS)
    for name, scores in scored.items():
        assert scores["questions"] == 12
        assert 0 <= scores["exact_match"] <= scores["f1"] <= 100
        predictions = json.loads((out / "predictions" / f"{name.replace('/', '_')}.json").read_text())
        assert len(predictions) == 12 and all(isinstance(v, str) for v in predictions.values())
    assert results["teacher"]["f1"] > 30  # the fine-tuned teacher answers; an untrained model cannot


def test_ch1_summary_is_the_mean_over_seeds_and_the_gain_is_paired(ch1_metrics):
    _, metrics = ch1_metrics
    results = metrics["results"]
    runs = results["runs"]
    for student in ("student_alone", "student_distilled"):
        f1s = [runs[f"{student}/seed{s}"]["f1"] for s in (0, 1)]
        assert results[student]["f1"] == pytest.approx(sum(f1s) / 2)
        assert results[student]["f1_std"] == pytest.approx(abs(f1s[0] - f1s[1]) / 2**0.5)
    gain = results["kd_gain"]["f1"]
    per_seed = [
        runs[f"student_distilled/seed{s}"]["f1"] - runs[f"student_alone/seed{s}"]["f1"] for s in (0, 1)
    ]
    assert gain["per_seed"] == pytest.approx(per_seed)
    assert gain["mean"] == pytest.approx(results["student_distilled"]["f1"] - results["student_alone"]["f1"])
    assert gain["seeds_improved"] == sum(g > 0 for g in per_seed)


def test_ch1_logs_each_loss_term(ch1_metrics):
    _, metrics = ch1_metrics
    curves = metrics["results"]["curves"]
    distilled = [h for h in curves["student_distilled/seed0"] if "loss_task" in h]
    alone = [h for h in curves["student_alone/seed0"] if "loss_task" in h]
    assert distilled and all("loss_kd" in h for h in distilled)
    assert alone and not any("loss_kd" in h for h in alone)
    assert any("eval_f1" in h for h in curves["student_distilled/seed0"])


def test_ch1_cites_the_paper(ch1_metrics):
    _, metrics = ch1_metrics
    ref = metrics["reference"]
    assert ref["citation"] == "sanh2019distilbert"
    assert (ref["student_distilled"]["exact_match"], ref["student_distilled"]["f1"]) == (79.1, 86.9)
    bib = (CHAPTERS["ch1"].source.parent.parent / "references.bib").read_text()
    assert "@article{sanh2019distilbert" in bib


def test_ch1_paper_profile_fails_fast_offline(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bookrun",
            "run",
            "ch1",
            "--profile",
            "paper",
            "--output-dir",
            str(tmp_path / "p"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    # stopped before the kernel started (bookrun.teachers.check_hub_models), naming the model
    assert result.returncode == 2, result.stderr[-2000:]
    assert "HF_HUB_OFFLINE is set" in result.stderr
    assert "'csarron/bert-base-uncased-squad-v1'" in result.stderr
    assert not list((tmp_path / "p").glob("*.ipynb")) and not (tmp_path / "p" / "metrics.json").exists()


def test_teacher_command_saves_a_loadable_stamped_teacher(shared_data, tmp_path, monkeypatch):
    from experiments.ch1_teacher import TeacherRecipe, train_teacher
    from kdlib.registry import STAMP, WEIGHTS, sha256_file

    monkeypatch.setenv("KDLIB_CACHE_DIR", str(tmp_path / "cache"))
    target = train_teacher(TeacherRecipe(max_steps=2, batch_size=2, output=str(tmp_path / "teacher")))
    stamp = json.loads((target / STAMP).read_text())
    assert stamp["sha256"] == sha256_file(target / WEIGHTS)
    assert stamp["recipe"]["max_steps"] == 2 and stamp["split"]["eval_articles"] == list(range(38, 48))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".teacher-")]


def smoke_metrics(smoke_book, key):
    """The metrics.json chapter `key` wrote in the smoke build of the whole book."""
    return json.loads((smoke_book / "outputs" / "smoke" / key / "metrics.json").read_text())


@pytest.fixture(scope="module")
def ch2_metrics(smoke_book):
    return smoke_metrics(smoke_book, "ch2")


def test_ch2_runs_every_strategy_and_seed(ch2_metrics):
    results = ch2_metrics["results"]
    strategies = ch2_metrics["parameters"]["strategies"]
    assert strategies == ["kd-only", "fixed-min", "fixed-ordered", "random-ordered"]  # smoke profile
    for strategy in strategies:
        accs = [results["runs"][f"{strategy}/seed{s}"]["accuracy"] for s in (0, 1)]
        summary = results["strategies"][strategy]
        assert summary["mean"] == pytest.approx(sum(accs) / 2)
        assert summary["min"] == min(accs) and summary["max"] == max(accs)
        assert all(0 <= a <= 100 for a in accs)
    assert 0 <= results["teacher"]["accuracy"] <= 100
    assert "fixed-ordered/seed0/cofi-weights" in results["runs"]


def test_ch2_alignments_respect_the_strategy(ch2_metrics):
    alignments = ch2_metrics["results"]["alignments"]
    fixed = alignments["fixed-min/seed0"]
    pairs = fixed["pairs"]
    used_rows = [t for t, row in enumerate(pairs) if sum(row) > 0]
    assert used_rows == [2, 5, 8, 11]  # only the fixed teacher layers are distilled
    assert len(fixed["last_matrix"]) == 4 and len(fixed["last_matrix"][0]) == 6
    assert sum(map(sum, alignments["kd-only/seed0"]["pairs"])) == 0  # no layer loss at all
    removed = alignments["fixed-ordered/seed0/removed"]["pairs"]
    assert all(row[1] == 0 and row[3] == 0 for row in removed)  # removed layers never matched
    assert sorted(
        {a for step in alignments["fixed-ordered/seed0/removed"]["per_step"] for a in step["alignment"]}
    ) == [
        0,
        2,
        4,
        5,
    ]  # ordered matching of four teacher layers onto the four remaining student layers
    for name, info in alignments.items():  # CoFi's matching replayed on every ordered run's steps
        ordered = name.split("/")[0] in ("fixed-ordered", "random-ordered")
        assert ("cofi_matching" in info) == ordered
        if ordered:
            assert info["cofi_matching"]["steps"] == 4  # every step of the run (32 sentences / 8)
            assert info["cofi_matching"]["past_last"] == 0  # no 6-layer run here lacks a candidate
        layered = not name.startswith("kd-only")
        assert ("per_step" in info) == (layered and "/seed0" in name)  # every step: first seed only
        if "per_step" in info:
            assert [step["step"] for step in info["per_step"]] == [1, 2, 3, 4]


def test_ch2_compares_with_intervals_and_its_claims_read_them(ch2_metrics):
    results = ch2_metrics["results"]
    assert {"random-ordered vs fixed-ordered", "fixed-ordered/cofi-weights vs kd-only",
            "fixed-ordered/cofi-warmup vs kd-only", "fixed-min vs kd-only"} <= set(results["comparisons"])
    for c in results["comparisons"].values():
        assert c["low"] <= c["difference"] <= c["high"] and c["seeds"] == [2, 2]
        assert c["relation"] == ch2.relation(*ch2.deciding_interval(c))
    assert [claim["verdict"] for claim in ch2_metrics["claims"]] == [
        ch2.verdict_of(results["comparisons"][name]["relation"])
        for name in ("random-ordered vs fixed-ordered", "fixed-ordered/cofi-weights vs kd-only",
                     "fixed-ordered/cofi-warmup vs kd-only")
    ]
    assert ch2.check_record(ch2_metrics) == []


def test_ch2_records_the_accuracy_curves_it_was_asked_for(ch2_metrics):
    results = ch2_metrics["results"]
    curves = results["accuracy_curves"]
    assert set(curves) == {"kd-only/seed0", "kd-only/seed1", "fixed-min/seed0", "fixed-ordered/seed0",
                           "random-ordered/seed0", "fixed-ordered/seed0/cofi-weights",
                           "fixed-ordered/seed0/cofi-warmup"}  # kd-only's seeds, the others' first
    for name, points in curves.items():
        assert [p["step"] for p in points] == [2, 4]  # curve_every 2 of 4 steps
        assert points[-1]["accuracy"] == results["runs"][name]["accuracy"]  # the final model
    teacher = results["teacher_accuracy_curve"]
    assert [p["step"] for p in teacher] == [1, 2]  # teacher_curve_every 1 of 2 steps
    assert teacher[-1]["accuracy"] == results["teacher"]["accuracy"]
    assert results["plateau"]["students"]["kd-only/seed0"] == pytest.approx(
        curves["kd-only/seed0"][1]["accuracy"] - curves["kd-only/seed0"][0]["accuracy"])


def test_ch2_teacher_fine_tunes_without_a_curve_as_the_default_profile_asks(shared_data, tmp_path):
    """The smoke book asks for the teacher's curve; the default profile does not (0), a branch
    only CI's default build reached until this test."""
    values = {**profile_values(CHAPTERS["ch2"], "smoke"), "teacher_curve_every": 0}
    cfg = chapter_config(CHAPTERS["ch2"], **values, profile="smoke", output_dir=str(tmp_path))
    experiment = ch2.LayerExperiment(cfg)
    accuracy = experiment.fine_tune_teacher()
    results = experiment.record["results"]
    assert "teacher_accuracy_curve" not in results and results["teacher"]["accuracy"] == accuracy
    assert [h["step"] for h in results["teacher_curve"] if "loss" in h] == [1, 2]  # it did train


def test_ch2_warmup_ramps_cofis_layer_weight(ch2_metrics):
    logged = [h for h in ch2_metrics["results"]["curves"]["fixed-ordered/seed0/cofi-warmup"] if "loss" in h]
    weights = [(h["loss"] - 0.1 * h["loss_kd"]) / h["loss_layer"] for h in logged]
    assert weights == pytest.approx([0.45, 0.9, 0.9, 0.9], abs=2e-3)  # 0.9 reached at half of 4 steps
    plain = [h for h in ch2_metrics["results"]["curves"]["fixed-ordered/seed0/cofi-weights"] if "loss" in h]
    weights = [(h["loss"] - 0.1 * h["loss_kd"]) / h["loss_layer"] for h in plain]
    assert weights == pytest.approx([0.9] * 4, abs=2e-3)  # as published: constant


def test_ch2_logs_layer_and_kd_terms(ch2_metrics):
    curves = ch2_metrics["results"]["curves"]
    layered = [h for h in curves["fixed-min/seed0"] if "loss" in h]
    assert layered and all("loss_layer" in h and "loss_kd" in h for h in layered)
    assert all("loss_layer" not in h for h in curves["kd-only/seed0"] if "loss" in h)
    cache = ch2_metrics["cache"]
    assert ch2_metrics["teacher_cache_mb"] > 0 and cache["hits"] + cache["misses"] == 1  # one lookup


def test_ch2_probe_takes_both_weightings_from_the_same_first_step(ch2_metrics):
    """The probe's two weightings start from the same student on the same batch: their first
    step's terms and gradients differ by the weights alone; each runs the steps asked for."""
    probe, steps = ch2_metrics["results"]["loss_terms"], ch2_metrics["parameters"]["probe_steps"]
    assert set(probe) == {"cofi", "chapter"}
    assert (probe["cofi"]["layer_weight"], probe["cofi"]["alpha_ce"]) == (0.9, 0.1)
    first = {}
    for name, run in probe.items():
        assert [row["step"] for row in run["steps"]] == list(range(1, steps + 1))
        assert all(-1 <= row["cosine_shared"] <= 1 for row in run["steps"])
        weight = {"layer": run["layer_weight"], "kd": run["alpha_ce"]}
        first[name] = {key: run["steps"][0][key] / weight[key.split("_")[0]]
                       for key in ("kd", "layer", "kd_grad_shared", "layer_grad_shared")}
    assert first["cofi"] == pytest.approx(first["chapter"], rel=1e-3)  # float32 backward rounding
    cosines = [run["steps"][0]["cosine_shared"] for run in probe.values()]
    assert cosines[0] == pytest.approx(cosines[1], abs=1e-4)


@pytest.fixture(scope="module")
def ch4_metrics(smoke_book):
    return smoke_metrics(smoke_book, "ch4")


def test_ch4_runs_every_method_and_seed(ch4_metrics):
    results = ch4_metrics["results"]
    methods = ["finetune-first", "extract-finetune", "theseus-constant", "theseus-linear", "proportional-0.5"]
    assert sorted(k.split("/")[0] for k in results["methods"]) == sorted(methods)
    for method in methods:
        accs = [results["runs"][f"{method}/L3/seed{s}"]["accuracy"] for s in (0, 1)]
        summary = results["methods"][f"{method}/L3"]
        assert summary["mean"] == pytest.approx(sum(accs) / 2)
        assert summary["min"] == min(accs) and summary["max"] == max(accs)
        assert all(0 <= a <= 100 for a in accs)
    assert ch4_metrics["data"]["classes"] == 77 and ch4_metrics["data"]["eval_examples"] == 16
    assert results["predecessor"]["layers"] == 6


def test_ch4_records_what_replacement_did(ch4_metrics):
    runs = ch4_metrics["results"]["runs"]
    constant = runs["theseus-constant/L3/seed0"]
    assert len(constant["replaced_fraction"]) == 3 and 0 <= constant["idle_steps"] <= 4
    assert "after_replacing" in runs["proportional-0.5/L3/seed0"]
    assert "replaced_fraction" not in runs["proportional-0.5/L3/seed0"]  # no coin flips
    assert "after_replacing" not in runs["finetune-first/L3/seed0"]
    steps = [p["step"] for p in constant["curve"]]
    assert steps == sorted(steps) and steps[-1] == 6  # replacing then successor steps, one axis


def test_ch4_records_accuracy_curves_on_the_same_axis(ch4_metrics):
    results = ch4_metrics["results"]
    assert [p["step"] for p in results["predecessor"]["accuracy_curve"]] == [2, 4]  # curve_every 2 of 4
    for name, run in results["runs"].items():
        points = run["accuracy_curve"]
        assert [p["step"] for p in points] == [2, 4, 6]  # 4 replacing + 2 successor steps, or 6 direct
        assert points[-1]["accuracy"] == run["accuracy"]  # the final model
        if "after_replacing" in run:
            assert points[1]["accuracy"] == run["after_replacing"]  # the successor alone at step 4
        gain = results["plateau"]["runs"][name]
        assert gain == pytest.approx(points[-1]["accuracy"] - points[1]["accuracy"])  # 6 vs 4 (<= 4.8)


@pytest.fixture(scope="module")
def ch3_metrics(smoke_book):
    return smoke_metrics(smoke_book, "ch3")


def test_ch3_scores_every_model_it_trains(ch3_metrics):
    models = ch3_metrics["results"]["models"]
    runs = ["kd-padded", "kd-packed", "clm-packed", "kd-packed-topk"]  # smoke profile
    assert list(models) == ["student-base", "teacher", *runs]
    for entry in models.values():
        heldout = entry["heldout"]
        assert heldout["perplexity"] == pytest.approx(math.exp(heldout["nll"]))
        assert heldout["tokens"] == 4 * 31  # 4 held-out blocks of 32 tokens, 31 predictions each
        assert {task: s["n"] for task, s in entry["zero_shot"].items()} == {"piqa": 2, "lambada": 2}
        assert 0 <= entry["zero_shot"]["piqa"]["acc"] <= 1 and entry["zero_shot"]["lambada"]["perplexity"] > 1
    assert models["teacher"]["parameters_m"] > models["student-base"]["parameters_m"]  # 30 vs 28 layers
    for run in runs:
        curve = models[run]["curve"]
        assert [p["step"] for p in curve] == [1, 2]
        assert ("loss_kd" in curve[0]) == (run != "clm-packed")
    assert models["kd-packed-topk"]["cache_mb"] > 0
    data = ch3_metrics["data"]
    assert data["rows_per_run"] == 4 and data["packed_tokens_seen"] == 4 * 32
    assert data["padded_tokens_seen"] <= 4 * 32


def test_ch3_measures_the_top_k_cache_and_checks_the_card(ch3_metrics):
    fidelity = ch3_metrics["results"]["topk_fidelity"]
    for temperature in ("T=1", "T=2"):
        shares = [fidelity[temperature]["topk"][k] for k in ("8", "64")]
        assert 0 < shares[0]["mass"] < shares[1]["mass"] <= 1  # more tokens hold more mass
        assert all(0 < s["kl_share"] <= 1 + 1e-4 for s in shares)  # top-k loss is a lower bound
    assert ch3_metrics["results"]["warm_start"]["candidates"]["28"]["layers"] == 28
    claims = {c["claim"]: c for c in ch3_metrics["claims"]}
    assert len(claims) == 3 and all(c["verdict"] in VERDICTS for c in claims.values())
    assert ch3.check_record(ch3_metrics) == []


def test_ch3_heals_the_base_on_other_text_and_records_its_curve(ch3_metrics):
    heal = ch3_metrics["results"]["heal"]
    assert [p["step"] for p in heal["curve"]] == [0, 1, 2]  # before, then heal_curve_every 1 of 2 steps
    base = ch3_metrics["results"]["models"]["student-base"]["heldout"]
    assert heal["curve"][-1]["perplexity"] == pytest.approx(base["perplexity"], rel=1e-5)  # the healed base
    steps = heal["curve"]
    assert heal["tail_drop"] == pytest.approx(1 - steps[2]["perplexity"] / steps[1]["perplexity"])
    assert ch3_metrics["data"]["heal"]["corpus"] == ["wikitext2-valid"]  # apart from wikitext2-test
    assert ch3_metrics["data"]["heal"]["rows_seen"] == 2 * 2
    assert base["perplexity_low"] < base["perplexity"] < base["perplexity_high"]
    assert len(base["row_nll"]) == 4  # one per held-out block


def test_ch3_record_check_catches_a_claim_that_its_models_do_not_give(ch3_metrics):
    tampered = json.loads(json.dumps(ch3_metrics))
    claim = tampered["claims"][0]
    claim["verdict"] = "not reproduced" if claim["verdict"] == "reproduced" else "reproduced"
    assert ch3.check_record(tampered) == ["the claims are not what the models give"]
    del tampered["results"]["models"]["kd-packed"]
    assert ch3.check_record(tampered) == ["model kd-packed was not scored"]


def test_ch1_student_is_its_encoders_chosen_layers_with_a_new_head():
    from bookrun.params import chapter_config
    from experiments.ch1_distilbert_squad import load_student
    from kdlib.qa_teacher import load_qa_model
    from kdlib.stack import layer_stack

    cfg = chapter_config(CHAPTERS["ch1"])  # the default: minilm-l6 cut to its layers 0, 2, 4
    student, _ = load_student(cfg)
    full, _ = load_qa_model(cfg.student)
    kept = layer_stack(student)
    assert len(kept) == len(cfg.student_layers) == student.config.num_hidden_layers == 3
    for layer, index in zip(kept, cfg.student_layers):
        source = layer_stack(full)[index].state_dict()
        assert all(torch.equal(v, source[k]) for k, v in layer.state_dict().items())
    embeddings = student.bert.embeddings.word_embeddings.weight
    assert torch.equal(embeddings, full.bert.embeddings.word_embeddings.weight)


def test_ch1_record_agrees_with_itself_and_tampering_is_caught(ch1_metrics):
    import copy

    from experiments.ch1_distilbert_squad import check_record

    _, metrics = ch1_metrics
    assert check_record(metrics) == []
    tampered = copy.deepcopy(metrics)
    tampered["results"]["student_distilled"]["f1"] += 1.0
    assert check_record(tampered) == [
        "student_distilled f1 {} is not its seeds' mean".format(
            tampered["results"]["student_distilled"]["f1"]
        )
    ]
    flipped = copy.deepcopy(metrics)
    flipped["claims"][0]["verdict"] = (
        "not reproduced" if metrics["claims"][0]["verdict"] != "not reproduced" else "reproduced"
    )
    assert check_record(flipped) == [
        "the verdict does not follow from the recorded gain by the chapter's rule"
    ]
