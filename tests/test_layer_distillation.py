"""LayerDistillationTrainer on tiny classifiers: the loss it optimises and the choices it logs."""

import numpy as np
import pytest
import torch
from transformers import BertForSequenceClassification

from kdlib.alignment import layer_loss_matrix
from kdlib.batching import FeatureDataset, PadCollator, RaggedArray
from kdlib.cache import TeacherOutputCache
from kdlib.config import ConfigError
from kdlib.layer_distillation import (
    PROJECTION,
    LayerDistillationArguments,
    LayerDistillationTrainer,
    add_projection,
    cached_teacher_states,
)
from kdlib.trainer import quiet_arguments

from conftest import tiny_bert_config


def models():
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_bert_config(layers=4, hidden=16)).eval()
    student = BertForSequenceClassification(tiny_bert_config(layers=3, hidden=8))
    add_projection(student, teacher.config.hidden_size)
    return teacher, student


def rows(n=8):
    g = torch.Generator().manual_seed(1)
    lengths = [3 + i % 4 for i in range(n)]
    ids = [torch.randint(5, 30, (length,), generator=g).tolist() for length in lengths]
    return {
        "input_ids": ids,
        "attention_mask": [[1] * len(x) for x in ids],
        "labels": [i % 2 for i in range(n)],
    }


def args(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        max_steps=4,
        logging_steps=1,
        seed=0,
        temperature=2.0,
        alpha_ce=0.1,
        alpha_task=0.0,
        layer_weight=0.9,
        selection="fixed",
        teacher_layers=[1, 3],
        num_teacher_layers=2,
        matching="one-to-one",
    )
    values.update(overrides)
    return quiet_arguments(LayerDistillationArguments, **values)


def batch_of(ds):
    return PadCollator(0)([ds[i] for i in range(len(ds))])


def test_loss_is_layer_plus_kd_as_defined(tmp_path):
    teacher, student = models()
    ds = FeatureDataset(rows())
    trainer = LayerDistillationTrainer(
        model=student, teacher_model=teacher, args=args(tmp_path), train_dataset=ds
    )
    batch = batch_of(ds)
    student.eval()
    loss = trainer.compute_loss(student, dict(batch))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        t = teacher(**inputs, output_hidden_states=True)
        s = student(**inputs, output_hidden_states=True)
        proj = getattr(student, PROJECTION)
        mask = batch["attention_mask"]
        # one-to-one: teacher layer 1 -> student layer 0, teacher layer 3 -> student layer 1
        layer = sum(
            layer_loss_matrix([t.hidden_states[tl + 1]], [proj(s.hidden_states[sl + 1])], mask)[0, 0]
            for tl, sl in ((1, 0), (3, 1))
        )
        from kdlib.losses import soft_target_kl

        kd = soft_target_kl(s.logits, t.logits, 2.0)
    assert loss.item() == pytest.approx(0.9 * layer.item() + 0.1 * kd.item(), rel=1e-5)


def test_cached_hidden_states_give_the_online_loss(tmp_path):
    teacher, student = models()
    data = rows()
    ds = FeatureDataset(data)
    hidden, logits = [], []
    with torch.no_grad():
        for ids in data["input_ids"]:
            out = teacher(input_ids=torch.tensor([ids]), output_hidden_states=True)
            hidden.append(torch.stack(out.hidden_states[1:], dim=2)[0].numpy())  # [seq, layers, width]
            logits.append(out.logits[0].numpy())
    cached = FeatureDataset(data, extra={"teacher_hidden_states": RaggedArray.from_rows(hidden)})
    cached.columns["teacher_logits"] = logits
    online = LayerDistillationTrainer(
        model=student, teacher_model=teacher, args=args(tmp_path), train_dataset=ds
    )
    offline = LayerDistillationTrainer(model=student, args=args(tmp_path), train_dataset=cached)
    student.eval()
    a = online.compute_loss(student, dict(batch_of(ds)))
    b = offline.compute_loss(student, dict(batch_of(cached)))
    assert a.item() == pytest.approx(b.item(), rel=1e-4)


def test_cached_teacher_states_are_the_teachers_outputs_computed_once(tmp_path):
    teacher, _ = models()
    data = rows()
    cache = TeacherOutputCache(tmp_path / "cache")
    first = cached_teacher_states(teacher, data, 0, cache)
    again = cached_teacher_states(teacher, data, 0, cache)
    assert (cache.misses, cache.hits) == (1, 1)  # the second call reads what the first stored
    tokens = sum(len(ids) for ids in data["input_ids"])
    assert first["megabytes"] == pytest.approx(tokens * 4 * 16 * 2 / 2**20)  # 4 layers x 16 wide, fp16
    for i, ids in enumerate(data["input_ids"]):
        with torch.no_grad():
            out = teacher(input_ids=torch.tensor([ids]), output_hidden_states=True)
        states = torch.stack(out.hidden_states[1:], dim=2)[0].numpy()  # [seq, layers, width], no embeddings
        np.testing.assert_allclose(first["teacher_hidden_states"][i], states, atol=5e-3)  # fp16 storage
        np.testing.assert_allclose(first["teacher_logits"][i], out.logits[0].numpy(), atol=1e-5)
        np.testing.assert_array_equal(again["teacher_hidden_states"][i], first["teacher_hidden_states"][i])


def test_training_logs_terms_and_the_alignment_of_every_step(tmp_path):
    teacher, student = models()
    ds = FeatureDataset(rows())
    trainer = LayerDistillationTrainer(
        model=student,
        teacher_model=teacher,
        train_dataset=ds,
        data_collator=PadCollator(0),
        args=args(tmp_path, selection="random", teacher_layers=None, matching="min"),
    )
    before = getattr(student, PROJECTION).weight.clone()
    trainer.train()
    assert not torch.equal(getattr(student, PROJECTION).weight, before)  # the projection learns
    log = trainer.alignment_log
    assert [entry["step"] for entry in log] == [1, 2, 3, 4]
    assert all(len(e["teacher_layers"]) == 2 and np.shape(e["loss_matrix"]) == (2, 3) for e in log)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert all("loss_layer" in h and "loss_kd" in h and "loss_task" not in h for h in logged)
    # the same seed draws the same layers
    _, student2 = models()
    again = LayerDistillationTrainer(
        model=student2,
        teacher_model=teacher,
        train_dataset=ds,
        data_collator=PadCollator(0),
        args=args(tmp_path, selection="random", teacher_layers=None, matching="min"),
    )
    again.train()
    assert [e["teacher_layers"] for e in again.alignment_log] == [e["teacher_layers"] for e in log]
    # ... and the same run: the same losses and the same final weights
    assert [h for h in again.state.log_history if "loss" in h] == logged
    for (name, a), b in zip(student.state_dict().items(), student2.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_layer_weight_warms_up_linearly_then_holds(tmp_path):
    teacher, student = models()
    trainer = LayerDistillationTrainer(
        model=student,
        teacher_model=teacher,
        train_dataset=FeatureDataset(rows()),
        data_collator=PadCollator(0),
        args=args(tmp_path, layer_warmup=0.5),  # 4 steps: the weight reaches 0.9 at step 2
    )
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    weights = [(h["loss"] - 0.1 * h["loss_kd"]) / h["loss_layer"] for h in logged]
    assert weights == pytest.approx([0.45, 0.9, 0.9, 0.9], abs=1e-3)


def test_removed_student_layers_are_never_matched(tmp_path):
    teacher, student = models()
    ds = FeatureDataset(rows())
    trainer = LayerDistillationTrainer(
        model=student,
        teacher_model=teacher,
        train_dataset=ds,
        data_collator=PadCollator(0),
        args=args(tmp_path, matching="min"),
        existing_student_layers=torch.tensor([True, False, True]),
    )
    trainer.train()
    assert all(1 not in entry["alignment"] for entry in trainer.alignment_log)


def test_teacher_layer_beyond_depth_is_named(tmp_path):
    teacher, student = models()
    ds = FeatureDataset(rows())
    trainer = LayerDistillationTrainer(
        model=student, teacher_model=teacher, train_dataset=ds, args=args(tmp_path, teacher_layers=[1, 4])
    )
    with pytest.raises(ValueError, match=r"\[4\] do not exist.*0..3"):
        trainer.compute_loss(student, dict(batch_of(ds)))


@pytest.mark.parametrize(
    "overrides, culprit",
    [
        ({"layer_weight": 1.5}, "layer_weight"),
        ({"selection": "best"}, "selection"),
        ({"matching": "greedy"}, "matching"),
        ({"teacher_layers": [1, 2, 3]}, "teacher_layers"),
        ({"num_teacher_layers": 0, "teacher_layers": None}, "num_teacher_layers"),
        ({"layer_weight": 0.0, "alpha_ce": 0.0, "alpha_task": 0.0}, "all 0"),
        ({"layer_warmup": 1.0}, "layer_warmup"),
        ({"layer_warmup": -0.1}, "layer_warmup"),
    ],
)
def test_arguments_name_the_bad_value(tmp_path, overrides, culprit):
    with pytest.raises(ConfigError, match=culprit):
        args(tmp_path, **overrides)


def test_layer_loss_alone_is_allowed(tmp_path):
    a = args(tmp_path, alpha_ce=0.0, alpha_task=0.0, layer_weight=1.0)
    assert a.loss_weights() == {"layer_weight": 1.0, "alpha_ce": 0.0, "alpha_task": 0.0}


def test_student_without_projection_is_refused(tmp_path):
    teacher, _ = models()
    student = BertForSequenceClassification(tiny_bert_config(layers=3, hidden=8))
    with pytest.raises(ValueError, match="add_projection"):
        LayerDistillationTrainer(
            model=student, teacher_model=teacher, args=args(tmp_path), train_dataset=FeatureDataset(rows())
        )


def test_defaults_are_cofis_recipe(tmp_path):
    a = LayerDistillationArguments(output_dir=str(tmp_path), report_to="none")
    assert (a.layer_weight, a.alpha_ce, a.alpha_task, a.temperature) == (0.9, 0.1, 0.0, 2.0)
    assert (a.selection, a.num_teacher_layers, a.matching) == ("fixed", 4, "ordered")


def fp16_cached(teacher, data, folder):
    """`data` with the teacher's logits and fp16 hidden states as columns, as chapter 2 caches them."""
    cached = cached_teacher_states(teacher, data, 0, TeacherOutputCache(folder / "cache"))
    dataset = FeatureDataset(data, extra={"teacher_hidden_states": cached["teacher_hidden_states"]})
    dataset.columns["teacher_logits"] = cached["teacher_logits"]
    return dataset


def test_bf16_trains_the_student_under_autocast_with_fp32_weights(tmp_path):
    teacher, student = models()
    seen = []
    query = student.bert.encoder.layer[0].attention.self.query
    query.register_forward_hook(lambda module, inputs, out: seen.append(out.dtype))
    trainer = LayerDistillationTrainer(
        model=student,
        args=args(tmp_path, bf16=True, use_cpu=not torch.cuda.is_available()),
        train_dataset=fp16_cached(teacher, rows(), tmp_path),
        data_collator=PadCollator(0),
    )
    trainer.train()
    assert len(seen) == 4 and set(seen) == {torch.bfloat16}  # one student forward per step
    assert {p.dtype for p in student.parameters()} == {torch.float32}
    assert all(np.isfinite(entry["loss_matrix"]).all() for entry in trainer.alignment_log)


def test_a_bf16_student_meets_the_fp16_cache_unrounded(tmp_path):
    """The cached teacher states enter the float32 loss matrix as stored, not first rounded to the
    student's bfloat16 (3 mantissa bits fewer than the cache's float16)."""
    teacher, student = models()
    dataset = fp16_cached(teacher, rows(), tmp_path)
    trainer = LayerDistillationTrainer(model=student, args=args(tmp_path), train_dataset=dataset)
    batch = batch_of(dataset)
    hidden = batch["teacher_hidden_states"]
    assert hidden.dtype == torch.float16
    assert not torch.equal(hidden.to(torch.bfloat16).to(torch.float16), hidden)  # rounding would show
    student.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = student(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
        )
        projected = [getattr(student, PROJECTION)(h) for h in outputs.hidden_states[1:]]
        got = trainer.layer_loss(outputs, dict(batch))
    assert projected[0].dtype == torch.bfloat16
    expected = layer_loss_matrix(
        [hidden[:, :, t].float() for t in (1, 3)], [p.float() for p in projected], batch["attention_mask"]
    )
    want = expected[0, 0] + expected[1, 1]  # one-to-one: teacher layers 1, 3 -> student layers 0, 1
    torch.testing.assert_close(got.float(), want, rtol=1e-6, atol=0)
