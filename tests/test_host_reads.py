"""The distillation trainers read nothing back to the host per training step beyond what they must.

On a GPU every read of a device tensor's value (`.item()`, `float()`, `bool()`, `.tolist()`,
`.cpu()`, `.nonzero()`'s data-dependent size) waits for all queued work: one per step per loss
term would stall the device each step. Here every such call is counted and charged to the
nearest caller outside torch; the reads kdlib's own code makes per training step (the difference
between a 4-step and a 2-step run, logging only at the end) must be exactly the allowance, each
of which is named with its reason. The Trainer's own reads are not counted: they are the same
with or without distillation.

On CPU a host read is free, so this test cannot see reads that happen inside C++ (e.g. boolean
indexing): it guards the Python-level bookkeeping, which is where they crept in before.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from test_layer_distillation import models as layer_models
from test_layer_distillation import rows as layer_rows
from test_lm_trainer import ROWS
from test_trainer import dataset as qa_dataset
from transformers import BertForSequenceClassification

import kdlib
from kdlib.batching import FeatureDataset, PadCollator
from kdlib.layer_distillation import LayerDistillationArguments, LayerDistillationTrainer
from kdlib.lm_trainer import LMDistillationArguments, LMDistillationTrainer
from kdlib.theseus import BernoulliReplacement, ProportionalAdd, TheseusTrainer, build_theseus
from kdlib.trainer import DistillationArguments, DistillationTrainer, quiet_arguments

from conftest import tiny_bert_config, tiny_llama

READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu", "numpy", "nonzero")
TORCH = str(Path(torch.__file__).parent)
KDLIB = str(Path(kdlib.__file__).parent)


@contextlib.contextmanager
def kdlib_host_reads() -> Iterator[list[str]]:
    """Every host read kdlib's code makes while the block runs, as 'file:line' of the caller."""
    calls: list[str] = []
    patched = {name: torch.Tensor.__dict__.get(name) for name in READS}

    def counted(method: Callable) -> Callable:
        @functools.wraps(method)
        def read(self: torch.Tensor, *args, **kwargs):
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith(TORCH):
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(KDLIB):
                calls.append(f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}")
            return method(self, *args, **kwargs)

        return read

    for name in READS:
        setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name)))
    try:
        yield calls
    finally:
        for name, original in patched.items():
            if original is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)


def per_step_reads(make_trainer: Callable[[int], object]) -> tuple[float, list[str]]:
    """kdlib's host reads per training step: a 4-step run's less a 2-step run's, halved."""
    counts = []
    for steps in (2, 4):
        trainer = make_trainer(steps)
        with kdlib_host_reads() as calls:
            trainer.train()
        counts.append(calls)
    return (len(counts[1]) - len(counts[0])) / 2, counts[1]


def common(tmp_path, steps: int, **overrides) -> dict:
    # logging only at the end: per-step bookkeeping must not read, a logging step may
    values = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=steps,
        logging_steps=1000,
        learning_rate=1e-3,
        seed=0,
    )
    return values | overrides


def classification_rows() -> FeatureDataset:
    return FeatureDataset(layer_rows(16))


def qa_trainer(tmp_path, tiny_qa_pair, tiny_tokenizer, cached: bool):
    teacher, student = tiny_qa_pair
    logits = None
    if cached:
        windows, _ = qa_dataset(tiny_tokenizer)
        width = max(windows.lengths())
        logits = {k: torch.randn(len(windows), width).numpy() for k in ("start_logits", "end_logits")}
    _, ds = qa_dataset(tiny_tokenizer, logits)

    def make(steps: int) -> DistillationTrainer:
        values = common(tmp_path, steps, alpha_ce=0.5, alpha_task=0.5, per_device_train_batch_size=1)
        args = quiet_arguments(DistillationArguments, **values)
        return DistillationTrainer(
            model=student,
            teacher_model=None if cached else teacher,
            args=args,
            train_dataset=ds,
            data_collator=PadCollator(0),
        )

    return make


def lm_trainer(tmp_path, cached: bool):
    rows = ROWS * 8
    columns = {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows], "labels": rows}
    extra = {}
    if cached:
        g = torch.Generator().manual_seed(2)
        extra = {
            "teacher_topk_indices": [torch.randint(0, 40, (len(r), 4), generator=g).numpy() for r in rows],
            "teacher_topk_logprobs": [
                torch.log_softmax(torch.randn(len(r), 5, generator=g), -1)[:, :4].numpy() for r in rows
            ],
        }
    data = FeatureDataset(columns, extra)

    def make(steps: int) -> LMDistillationTrainer:
        args = common(tmp_path, steps, temperature=2.0, alpha_ce=0.5, alpha_task=0.5)
        return LMDistillationTrainer(
            model=tiny_llama(layers=1, seed=1),
            teacher_model=None if cached else tiny_llama(layers=2, seed=0),
            args=quiet_arguments(LMDistillationArguments, **args),
            train_dataset=data,
            data_collator=PadCollator(0, pad_values={"labels": -100}),
        )

    return make


def layer_trainer(tmp_path, selection: str, matching: str):
    def make(steps: int) -> LayerDistillationTrainer:
        teacher, student = layer_models()
        args = common(
            tmp_path,
            steps,
            temperature=2.0,
            alpha_ce=0.1,
            alpha_task=0.0,
            layer_weight=0.9,
            selection=selection,
            num_teacher_layers=2,
            matching=matching,
        )
        if selection == "fixed":
            args["teacher_layers"] = [1, 3]
        return LayerDistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=quiet_arguments(LayerDistillationArguments, **args),
            train_dataset=classification_rows(),
            data_collator=PadCollator(0),
        )

    return make


def theseus_trainer(tmp_path, policy):
    def make(steps: int) -> TheseusTrainer:
        torch.manual_seed(0)
        model = BertForSequenceClassification(tiny_bert_config(layers=4))
        build_theseus(model, successor_layers=2, policy=policy)
        args = common(tmp_path, steps, alpha_ce=0.0, alpha_task=1.0)
        return TheseusTrainer(
            model=model,
            args=quiet_arguments(DistillationArguments, **args),
            train_dataset=classification_rows(),
            data_collator=PadCollator(0),
        )

    return make


# (name, trainer factory, allowed reads per step and why)
CASES = {
    "qa online": (lambda p, pair, tok: qa_trainer(p, pair, tok, cached=False), 0, ""),
    "qa cached logits": (lambda p, pair, tok: qa_trainer(p, pair, tok, cached=True), 0, ""),
    "lm online": (
        lambda p, *_: lm_trainer(p, cached=False),
        1,
        "the loss keeps the rows that have a target or a mask (nonzero): it never computes the "
        "vocabulary-wide softmax of padding",
    ),
    "lm cached top-k": (lambda p, *_: lm_trainer(p, cached=True), 1, "as online"),
    "layer fixed/min": (lambda p, *_: layer_trainer(p, "fixed", "min"), 0, ""),
    "layer fixed/ordered": (lambda p, *_: layer_trainer(p, "fixed", "ordered"), 0, ""),
    "layer random/one-to-one": (
        lambda p, *_: layer_trainer(p, "random", "one-to-one"),
        1,
        "the teacher layers drawn from the trainer's CPU generator (randperm), a host tensor",
    ),
    "theseus binary": (
        lambda p, *_: theseus_trainer(p, BernoulliReplacement(0.5)),
        2,
        "one coin per group (2 groups) drawn on the host's RNG, a host tensor",
    ),
    "theseus proportional": (lambda p, *_: theseus_trainer(p, ProportionalAdd(0.5)), 0, ""),
}


@pytest.mark.parametrize("case", list(CASES))
def test_training_steps_read_nothing_back_but_the_methods_own(case, tmp_path, tiny_qa_pair, tiny_tokenizer):
    factory, allowed, why = CASES[case]
    reads, where = per_step_reads(factory(tmp_path, tiny_qa_pair, tiny_tokenizer))
    assert reads == allowed, f"{case}: {reads} host reads per step (allowed {allowed}: {why}); at {where}"


def test_the_counter_sees_a_read_in_kdlib_bookkeeping(tmp_path, monkeypatch, tiny_qa_pair, tiny_tokenizer):
    """The check can fail: a trainer that floats each term per step, as kdlib's once did."""
    record = DistillationTrainer._record

    def float_each_term(self, **terms):
        for value in terms.values():
            float(value.detach())  # charged to this file (KDLIB below), as it was to kdlib
        record(self, **terms)

    monkeypatch.setattr(DistillationTrainer, "_record", float_each_term)
    monkeypatch.setattr(sys.modules[__name__], "KDLIB", str(Path(__file__).parent))
    reads, _ = per_step_reads(qa_trainer(tmp_path, tiny_qa_pair, tiny_tokenizer, cached=True))
    assert reads == 3  # kd, task and total each step
