"""DistillationTrainer on tiny QA models: the loss it optimises, the teacher, the logs."""

import copy

import numpy as np
import pytest
import torch

from kdlib import qa
from kdlib.batching import PadCollator
from kdlib.config import ConfigError
from kdlib.losses import soft_target_kl
from kdlib.qa_teacher import window_dataset
from kdlib.trainer import (
    DistillationArguments,
    DistillationTrainer,
    LossNotFiniteError,
    check_same_tokenization,
    quiet_arguments,
)

from conftest import WORDS, make_tokenizer

CONTEXTS = [
    "the eiffel tower was built in 1889 by gustave eiffel in paris france",
    "the river flows through london the capital of england",
]


def examples():
    rows = []
    for i, (question, answer, context) in enumerate(
        [
            ("who built the eiffel tower", "gustave eiffel", CONTEXTS[0]),
            ("when was the tower built", "1889", CONTEXTS[0]),
            ("what is the capital of england", "london", CONTEXTS[1]),
            ("where is paris", "france", CONTEXTS[0]),
        ]
    ):
        rows.append(
            {
                "id": f"q{i}",
                "question": question,
                "context": context,
                "answers": {"text": [answer], "answer_start": [context.index(answer)]},
            }
        )
    return rows


def dataset(tokenizer, teacher_logits=None):
    windows = qa.prepare_windows(examples(), tokenizer, max_length=24, stride=4)
    return windows, window_dataset(windows, teacher_logits)


def args(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        max_steps=3,
        logging_steps=1,
        seed=0,
        temperature=2.0,
        alpha_ce=0.5,
        alpha_task=0.5,
    )
    values.update(overrides)
    return quiet_arguments(DistillationArguments, **values)


def batch_of(ds, tokenizer):
    return PadCollator(tokenizer.pad_token_id)([ds[i] for i in range(len(ds))])


def test_loss_is_the_weighted_sum_of_kd_and_task(tmp_path, tiny_qa_pair, tiny_tokenizer):
    teacher, student = tiny_qa_pair
    _, ds = dataset(tiny_tokenizer)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args(tmp_path, alpha_ce=0.3, alpha_task=0.7),
        train_dataset=ds,
        data_collator=PadCollator(0),
    )
    batch = batch_of(ds, tiny_tokenizer)
    student.eval()  # no dropout: the comparison is exact
    loss = trainer.compute_loss(student, dict(batch))
    with torch.no_grad():
        s = student(**batch)
        t = teacher(**{k: v for k, v in batch.items() if "position" not in k})
    valid = batch["attention_mask"].bool()
    kd = (
        soft_target_kl(s.start_logits, t.start_logits, 2.0, class_mask=valid)
        + soft_target_kl(s.end_logits, t.end_logits, 2.0, class_mask=valid)
    ) / 2
    assert loss.item() == pytest.approx(0.3 * kd.item() + 0.7 * s.loss.item(), rel=1e-5)


def test_cached_teacher_logits_give_the_online_loss(tmp_path, tiny_qa_pair, tiny_tokenizer):
    teacher, student = tiny_qa_pair
    windows, ds = dataset(tiny_tokenizer)
    batch = batch_of(ds, tiny_tokenizer)
    teacher.eval()
    with torch.no_grad():
        out = teacher(**{k: v for k, v in batch.items() if "position" not in k})
    width = max(windows.lengths())
    cached = {k: np.zeros((len(windows), width), np.float32) for k in ("start_logits", "end_logits")}
    for key in cached:
        cached[key][:, : out[key].shape[1]] = out[key].numpy()
    _, cached_ds = dataset(tiny_tokenizer, cached)
    online = DistillationTrainer(model=student, teacher_model=teacher, args=args(tmp_path), train_dataset=ds)
    offline = DistillationTrainer(model=student, args=args(tmp_path), train_dataset=cached_ds)
    student.eval()
    a = online.compute_loss(student, dict(batch))
    b = offline.compute_loss(student, dict(batch_of(cached_ds, tiny_tokenizer)))
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_training_leaves_teacher_frozen_and_logs_each_term(tmp_path, tiny_qa_pair, tiny_tokenizer):
    teacher, student = tiny_qa_pair
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = student.qa_outputs.weight.clone()
    _, ds = dataset(tiny_tokenizer)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args(tmp_path),
        train_dataset=ds,
        data_collator=PadCollator(0),
    )
    trainer.train()
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not torch.equal(student.qa_outputs.weight, student_before)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all("loss_kd" in h and "loss_task" in h for h in logged)
    assert all(h["loss_kd"] >= 0 for h in logged)


def test_same_seed_gives_the_same_online_kd_run(tmp_path, tiny_qa_pair, tiny_tokenizer):
    teacher, student = tiny_qa_pair
    initial = copy.deepcopy(student)
    _, ds = dataset(tiny_tokenizer)

    def run(model, folder):
        trainer = DistillationTrainer(
            model=model,
            teacher_model=teacher,
            args=args(folder),
            train_dataset=ds,
            data_collator=PadCollator(0),
        )
        trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    assert run(student, tmp_path / "a") == run(initial, tmp_path / "b")
    for (name, a), b in zip(student.state_dict().items(), initial.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_alpha_ce_zero_is_plain_fine_tuning(tmp_path, tiny_qa_pair, tiny_tokenizer):
    _, student = tiny_qa_pair
    _, ds = dataset(tiny_tokenizer)
    trainer = DistillationTrainer(
        model=student, args=args(tmp_path, alpha_ce=0.0, alpha_task=1.0), train_dataset=ds
    )
    batch = batch_of(ds, tiny_tokenizer)
    student.eval()
    assert trainer.compute_loss(student, dict(batch)).item() == pytest.approx(
        student(**batch).loss.item(), rel=1e-6
    )


def test_without_teacher_or_cache_the_error_says_so(tmp_path, tiny_qa_pair, tiny_tokenizer):
    _, student = tiny_qa_pair
    _, ds = dataset(tiny_tokenizer)
    trainer = DistillationTrainer(model=student, args=args(tmp_path), train_dataset=ds)
    with pytest.raises(ValueError, match="teacher"):
        trainer.compute_loss(student, dict(batch_of(ds, tiny_tokenizer)))


def test_nan_loss_stops_naming_the_term_and_step(tmp_path, tiny_qa_pair, tiny_tokenizer):
    teacher, student = tiny_qa_pair
    windows, ds = dataset(tiny_tokenizer)
    width = max(windows.lengths())
    bad = {k: np.full((len(windows), width), np.nan, np.float32) for k in ("start_logits", "end_logits")}
    _, bad_ds = dataset(tiny_tokenizer, bad)
    trainer = DistillationTrainer(
        model=student, args=args(tmp_path), train_dataset=bad_ds, data_collator=PadCollator(0)
    )
    with pytest.raises(LossNotFiniteError, match="'kd'.*step 1"):
        trainer.train()


@pytest.mark.parametrize(
    "field, value", [("temperature", 0.0), ("temperature", -2.0), ("alpha_ce", 1.5), ("alpha_task", -0.1)]
)
def test_arguments_are_range_checked_by_name(tmp_path, field, value):
    with pytest.raises(ConfigError, match=field):
        args(tmp_path, **{field: value})


def test_both_weights_zero_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="alpha_ce and alpha_task are all 0"):
        args(tmp_path, alpha_ce=0.0, alpha_task=0.0)


def test_different_tokenizers_are_refused_up_front(tmp_path, tiny_qa_pair, tiny_tokenizer):
    teacher, student = tiny_qa_pair
    other = make_tokenizer(WORDS[:-1] + ["zebra"])
    with pytest.raises(ValueError, match="tokenizers differ.*zebra"):
        check_same_tokenization(tiny_tokenizer, other)
    _, ds = dataset(tiny_tokenizer)
    with pytest.raises(ValueError, match="tokenizers differ"):
        DistillationTrainer(
            model=student,
            teacher_model=teacher,
            teacher_tokenizer=other,
            processing_class=tiny_tokenizer,
            args=args(tmp_path),
            train_dataset=ds,
        )


def test_same_vocabulary_but_different_casing_is_refused(tiny_tokenizer):
    from transformers import BertTokenizer

    cased = BertTokenizer(vocab=tiny_tokenizer.get_vocab(), do_lower_case=False)
    with pytest.raises(ValueError, match="tokenise differently"):
        check_same_tokenization(tiny_tokenizer, cased)


def test_mismatched_vocab_sizes_are_refused(tmp_path, tiny_tokenizer):
    from transformers import BertForQuestionAnswering

    from conftest import tiny_bert_config

    teacher = BertForQuestionAnswering(tiny_bert_config(vocab_size=50))
    student = BertForQuestionAnswering(tiny_bert_config())
    _, ds = dataset(tiny_tokenizer)
    with pytest.raises(ValueError, match="vocab_size"):
        DistillationTrainer(model=student, teacher_model=teacher, args=args(tmp_path), train_dataset=ds)


def test_evaluation_keeps_dataset_order_when_training_groups_by_length(
    tmp_path, tiny_qa_pair, tiny_tokenizer
):
    # Regression: the Trainer evaluated in length-grouped, shuffled order, so SQuAD metrics
    # matched predictions to the wrong windows.
    _, student = tiny_qa_pair
    windows, ds = dataset(tiny_tokenizer)
    trainer = DistillationTrainer(
        model=student,
        args=args(tmp_path, alpha_ce=0.0, alpha_task=1.0, train_sampling_strategy="group_by_length"),
        train_dataset=ds,
        eval_dataset=ds,
        data_collator=PadCollator(0),
    )
    predicted = trainer.predict(ds).predictions[0]
    student.eval()
    for i in range(len(ds)):
        row = PadCollator(0)([ds[i]])
        with torch.no_grad():
            expected = student(**{k: v for k, v in row.items() if "position" not in k}).start_logits[0]
        n = len(windows.offsets[i])
        np.testing.assert_allclose(predicted[i][:n], expected.numpy(), rtol=1e-4, atol=1e-5)


def test_forward_inputs_sees_through_ddp_style_wrappers(tiny_qa_pair):
    from kdlib.trainer import forward_inputs

    class Wrapper(torch.nn.Module):  # what DistributedDataParallel looks like to inspect
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    _, student = tiny_qa_pair
    inputs = {"input_ids": 1, "attention_mask": 1, "start_positions": 0, "teacher_start_logits": 0, "x": 2}
    assert set(forward_inputs(Wrapper(student), inputs, labels=True)) == {
        "input_ids",
        "attention_mask",
        "start_positions",
    }
    assert set(forward_inputs(student, inputs, labels=False)) == {"input_ids", "attention_mask"}


def test_aligned_tokenization_allows_other_ids_but_not_other_pieces(tiny_tokenizer):
    from kdlib.trainer import check_aligned_tokenization

    shifted = make_tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "zzz"] + WORDS[5:])  # other ids
    check_aligned_tokenization(tiny_tokenizer, shifted, ["the tower was built in paris"])
    other = make_tokenizer([w for w in WORDS if w != "tower"])
    with pytest.raises(ValueError, match="tokenise 'the tower"):
        check_aligned_tokenization(tiny_tokenizer, other, ["the tower was built"])


def test_teacher_precision_is_part_of_the_cache_key(tmp_path, tiny_qa_pair, tiny_tokenizer):
    from kdlib.cache import TeacherOutputCache
    from kdlib.qa_teacher import teacher_span_logits

    teacher, _ = tiny_qa_pair
    windows, _ = dataset(tiny_tokenizer)
    cache = TeacherOutputCache(tmp_path)
    full = teacher_span_logits(teacher, windows, 0, cache, precision="float32")
    half = teacher_span_logits(teacher, windows, 0, cache, precision="bfloat16")
    assert cache.hits == 0  # the bfloat16 pass is not served the float32 entry
    assert half["start_logits"].dtype == np.float32
    assert not np.array_equal(full["start_logits"], half["start_logits"])
    np.testing.assert_allclose(half["start_logits"], full["start_logits"], atol=0.1)
    teacher_span_logits(teacher, windows, 0, cache, precision="bfloat16")
    assert cache.hits == 1


def test_quiet_arguments_print_nothing_but_keep_the_log(tmp_path, tiny_qa_pair, tiny_tokenizer):
    from transformers import PrinterCallback

    _, student = tiny_qa_pair
    _, data = dataset(tiny_tokenizer)
    quiet = args(tmp_path, alpha_ce=0.0, alpha_task=1.0)
    assert (quiet.disable_tqdm, quiet.print_logs, quiet.save_strategy) == (True, False, "no")
    assert quiet_arguments(output_dir=str(tmp_path), save_strategy="steps").save_strategy == "steps"
    trainer = DistillationTrainer(model=student, args=quiet, train_dataset=data, data_collator=PadCollator(0))
    assert not any(isinstance(c, PrinterCallback) for c in trainer.callback_handler.callbacks)
    trainer.train()
    assert any("loss_task" in entry for entry in trainer.state.log_history)  # logged, not printed
    loud = args(tmp_path, alpha_ce=0.0, alpha_task=1.0, print_logs=True)
    trainer = DistillationTrainer(model=student, args=loud, train_dataset=data, data_collator=PadCollator(0))
    assert any(isinstance(c, PrinterCallback) for c in trainer.callback_handler.callbacks)
