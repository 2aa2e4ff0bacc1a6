"""LMDistillationTrainer on tiny Llama models: the loss it computes, online and from a top-k cache."""

import pytest
import torch

from kdlib.batching import FeatureDataset, PadCollator
from kdlib.config import ConfigError
from kdlib.lm import TeacherHead, body_and_head, token_divergence, topk_forward_kl, topk_teacher
from kdlib.lm_trainer import LMDistillationArguments, LMDistillationTrainer
from kdlib.trainer import quiet_arguments

from conftest import tiny_llama

ROWS = [[5, 9, 3, 7, 2, 11], [4, 8, 6]]


def llama(layers, seed, vocab=40):
    return tiny_llama(layers=layers, vocab=vocab, seed=seed)


def batch(extra=None):
    columns = {"input_ids": ROWS, "attention_mask": [[1] * len(r) for r in ROWS], "labels": ROWS}
    rows = [
        dict({k: v[i] for k, v in columns.items()}, **{k: v[i] for k, v in (extra or {}).items()})
        for i in range(2)
    ]
    return PadCollator(0, pad_values={"labels": -100})(rows), columns


def trainer(tmp_path, teacher=None, **overrides):
    values = dict(
        output_dir=str(tmp_path),
        temperature=2.0,
        alpha_ce=0.5,
        alpha_task=0.5,
    )
    values.update(overrides)
    _, columns = batch()
    return LMDistillationTrainer(
        model=llama(1, seed=1),
        teacher_model=teacher,
        args=quiet_arguments(LMDistillationArguments, **values),
        train_dataset=FeatureDataset(columns),
        data_collator=PadCollator(0, pad_values={"labels": -100}),
    )


@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
def test_online_loss_is_the_weighted_sum_of_kd_and_clm(tmp_path, divergence):
    teacher = llama(2, seed=0)
    t = trainer(tmp_path, teacher=teacher, divergence=divergence)
    inputs, _ = batch()
    loss = t.compute_loss(t.model.train(), inputs)
    with torch.no_grad():
        student_out = t.model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=inputs["labels"]
        )
        teacher_logits = teacher(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        ).logits
    mask = inputs["attention_mask"].bool()
    kd = token_divergence(student_out.logits, teacher_logits, 2.0, mask, divergence)
    assert loss.item() == pytest.approx(0.5 * kd.item() + 0.5 * student_out.loss.item(), rel=1e-5)


class ScaledLogits(torch.nn.Module):
    """A causal LM whose logits are more than its output layer's (as a logit scale makes them)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    @property
    def base_model(self):
        return self.model.model

    def get_output_embeddings(self):
        return self.model.lm_head

    def forward(self, input_ids, attention_mask=None):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        out.logits = out.logits * 0.5
        return out


def test_an_online_teacher_is_run_to_its_hidden_states_when_its_logits_are_its_head_s(tmp_path):
    """Forward KL takes the teacher's logits block by block from its last hidden states; a
    teacher whose forward does more keeps its whole logits, and both give the defined loss."""
    inputs, _ = batch()
    plain, scaled = llama(2, seed=0), ScaledLogits(llama(2, seed=0))
    assert body_and_head(plain) == (plain.model, plain.lm_head)
    assert body_and_head(scaled) is None
    for teacher, blockwise in ((plain, True), (scaled, False)):
        t = trainer(tmp_path, teacher=teacher)
        assert isinstance(t.teacher_logits(inputs)["logits"], TeacherHead) == blockwise
        loss = t.compute_loss(t.model.train(), inputs)
        with torch.no_grad():
            student_out = t.model(**inputs)
            teacher_logits = teacher(inputs["input_ids"], inputs["attention_mask"]).logits
        kd = token_divergence(student_out.logits, teacher_logits, 2.0, inputs["attention_mask"].bool())
        assert loss.item() == pytest.approx(0.5 * kd.item() + 0.5 * student_out.loss.item(), rel=1e-5)
    reverse = trainer(tmp_path, teacher=plain, divergence="reverse")
    assert isinstance(reverse.teacher_logits(inputs)["logits"], torch.Tensor)


def test_cached_topk_teacher_gives_the_bucketed_kl(tmp_path):
    teacher = llama(2, seed=0)
    inputs, _ = batch()
    with torch.no_grad():
        logits = teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    indices, log_probs = topk_teacher(logits, k=8, temperature=2.0)
    lengths = [len(r) for r in ROWS]
    extra = {
        "teacher_topk_indices": [indices[i, : lengths[i]].numpy() for i in range(2)],
        "teacher_topk_logprobs": [log_probs[i, : lengths[i]].numpy() for i in range(2)],
    }
    cached, _ = batch(extra)
    t = trainer(tmp_path, alpha_ce=1.0, alpha_task=0.0)  # no teacher model: the cache is all there is
    loss = t.compute_loss(t.model.train(), cached)
    with torch.no_grad():
        student = t.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    expected = topk_forward_kl(student, indices, log_probs, 2.0, inputs["attention_mask"].bool())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    t.args.divergence = "reverse"
    with pytest.raises(ConfigError, match="top-k cache supports forward KL only"):
        t.compute_loss(t.model.train(), cached)


def test_bad_lm_settings_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="divergence"):
        LMDistillationArguments(output_dir=str(tmp_path), divergence="tv")
    with pytest.raises(ConfigError, match="jsd_beta"):
        LMDistillationArguments(output_dir=str(tmp_path), divergence="jsd", jsd_beta=0.0)
    with pytest.raises(ValueError, match="vocab_size"):
        trainer(tmp_path, teacher=llama(2, seed=0, vocab=48))


def test_perplexity_is_exp_of_the_mean_token_nll_and_ignores_padding():
    from kdlib.lm import perplexity

    model = llama(1, seed=3).eval()
    with torch.no_grad():
        nlls = []
        for row in ROWS:
            ids = torch.tensor([row])
            logits = model(input_ids=ids).logits[0, :-1]
            nlls += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none").tolist()
    result = perplexity(model, ROWS, batch_size=2)  # the short row is padded in its batch
    assert result["tokens"] == len(nlls) == 7
    assert result["nll"] == pytest.approx(sum(nlls) / 7, rel=1e-5)
    assert result["perplexity"] == pytest.approx(torch.tensor(sum(nlls) / 7).exp().item(), rel=1e-5)
    assert perplexity(model, ROWS, batch_size=1)["nll"] == pytest.approx(result["nll"], rel=1e-5)
    # each row's own mean NLL, in the rows' order, though batches run shortest rows first
    starts = [0]
    for row in ROWS:
        starts.append(starts[-1] + len(row) - 1)
    by_row = [sum(nlls[a:b]) / (b - a) for a, b in zip(starts, starts[1:])]
    assert result["row_nll"] == pytest.approx(by_row, rel=1e-5)


def test_perplexity_interval_is_over_rows_and_narrows_with_more_of_them():
    from kdlib.lm import perplexity

    model = llama(1, seed=3).eval()
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 40, (32, 6), generator=g).tolist()
    few, many = perplexity(model, rows[:4]), perplexity(model, rows)
    for result in (few, many):
        nll = torch.tensor(result["row_nll"], dtype=torch.float64)
        half = 1.96 * nll.std() / len(nll) ** 0.5  # rows of equal length: the row mean is the token mean
        assert result["perplexity_low"] == pytest.approx(float((nll.mean() - half).exp()), rel=1e-6)
        assert result["perplexity_low"] < result["perplexity"] < result["perplexity_high"]
    assert many["perplexity_high"] / many["perplexity_low"] < few["perplexity_high"] / few["perplexity_low"]


def test_same_seed_gives_the_same_lm_distillation_run(tmp_path):
    def run(folder):
        t = trainer(folder, teacher=llama(2, seed=0), max_steps=3, per_device_train_batch_size=2, seed=7)
        t.train()
        return [h["loss"] for h in t.state.log_history if "loss" in h], t.model.state_dict()

    (losses_a, weights_a), (losses_b, weights_b) = run(tmp_path / "a"), run(tmp_path / "b")
    assert losses_a == losses_b
    for key in weights_a:
        torch.testing.assert_close(weights_a[key], weights_b[key], rtol=0, atol=0)


def test_gradient_accumulation_averages_the_micro_batches(tmp_path):
    """Two accumulated batches of 2 rows move the weights as one batch of 4 rows does.

    The Trainer leaves the division by the accumulation steps to a model that takes loss
    arguments (as Llama's forward does); the distillation loss is a per-batch mean, so the
    trainer must have the Trainer divide, or the update (and the logged loss) is 2x too large.
    """
    rows = [[5, 9, 3, 7], [4, 8, 6, 2], [7, 7, 1, 3], [9, 2, 2, 5]]  # equal lengths: equal weights
    teacher = llama(2, seed=0)
    columns = {"input_ids": rows, "attention_mask": [[1] * 4] * 4, "labels": rows}

    def update(batch_size, accumulation):
        student = llama(1, seed=1)
        before = student.lm_head.weight.detach().clone()
        t = LMDistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=quiet_arguments(
                LMDistillationArguments,
                output_dir=str(tmp_path),
                per_device_train_batch_size=batch_size,
                gradient_accumulation_steps=accumulation,
                max_steps=1,
                optim="sgd",
                learning_rate=1.0,
                lr_scheduler_type="constant",
                max_grad_norm=0.0,
                train_sampling_strategy="sequential",
            ),
            train_dataset=FeatureDataset(columns),
            data_collator=PadCollator(0, pad_values={"labels": -100}),
        )
        t.train()
        logged = [h["loss"] for h in t.state.log_history if "loss" in h]
        return student.lm_head.weight.detach() - before, logged

    whole, whole_loss = update(4, 1)
    accumulated, accumulated_loss = update(2, 2)
    assert whole.abs().max() > 0
    torch.testing.assert_close(accumulated, whole, rtol=1e-4, atol=1e-6)
    assert accumulated_loss == pytest.approx(whole_loss, rel=1e-4)
