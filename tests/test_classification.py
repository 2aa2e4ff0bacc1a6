"""kdlib.classification's accuracy curve on a tiny classifier: where it scores, and that
scoring during training leaves the training itself unchanged."""

import pytest
import torch
from transformers import BertForSequenceClassification

from kdlib.classification import AccuracyCurve, accuracy, fine_tune, tail_gain

from conftest import tiny_bert_config


def columns(n=12):
    g = torch.Generator().manual_seed(3)
    ids = [torch.randint(5, 30, (3 + i % 4,), generator=g).tolist() for i in range(n)]
    return {
        "input_ids": ids,
        "attention_mask": [[1] * len(x) for x in ids],
        "labels": [i % 2 for i in range(n)],
    }


def tiny_classifier():
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config(layers=2, hidden=8))


def trained(tmp_path, callbacks=None, model=None, bf16=False):
    """`model` (a fresh tiny classifier if None) after 5 steps on `columns()`."""
    model = model or tiny_classifier()
    fine_tune(
        model,
        columns(),
        0,
        output_dir=str(tmp_path),
        steps=5,
        batch_size=4,
        learning_rate=1e-2,
        seed=0,
        callbacks=callbacks,
        bf16=bf16,
    )
    return model


def test_the_curve_scores_every_few_steps_and_after_the_last(tmp_path):
    curve = AccuracyCurve(columns(), 0, every=2)
    model = trained(tmp_path, [curve])
    assert [p["step"] for p in curve.points] == [2, 4, 5]
    assert curve.points[-1]["accuracy"] == accuracy(model, columns(), 0)  # the final model's score


def test_scoring_during_training_changes_nothing_in_it(tmp_path):
    plain = trained(tmp_path / "plain")
    scored = trained(tmp_path / "scored", [AccuracyCurve(columns(), 0, every=1)])
    for (name, a), b in zip(plain.state_dict().items(), scored.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_a_curve_needs_a_positive_interval():
    with pytest.raises(ValueError, match="every >= 1"):
        AccuracyCurve(columns(), 0, every=0)


def test_tail_gain_is_what_the_last_fifth_of_the_steps_added():
    points = [{"step": s, "accuracy": a} for s, a in ((50, 60.0), (100, 70.0), (200, 74.0), (250, 74.5))]
    assert tail_gain(points) == pytest.approx(0.5)  # 250 minus 200 (= 80% of 250)
    assert tail_gain(points, share=0.5) == pytest.approx(4.5)  # 250 minus 100 (the last at <= 125)
    assert tail_gain(points[:1]) is None and tail_gain([]) is None


def dtypes_seen(model):
    """The output dtypes of the model's first attention projection, recorded call by call."""
    seen = []
    layer = model.bert.encoder.layer[0].attention.self.query
    layer.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    return seen


@pytest.mark.parametrize("bf16", [False, True])
def test_bf16_runs_training_and_scoring_under_autocast_with_fp32_weights(tmp_path, bf16):
    model = tiny_classifier()
    seen = dtypes_seen(model)
    trained(tmp_path, [AccuracyCurve(columns(), 0, every=5, bf16=bf16)], model, bf16)
    expected = torch.bfloat16 if bf16 else torch.float32
    assert seen and set(seen) == {expected}  # the training steps' forwards and the curve's
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    seen.clear()
    assert 0.0 <= accuracy(model, columns(), 0, bf16=bf16) <= 100.0
    assert set(seen) == {expected}
