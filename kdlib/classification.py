"""Sentence classification helpers the chapters share: load, encode, score.

Evaluation runs shortest sentences first (`inference_batches`), so almost nothing is spent on
padding; predictions are put back in the data's order before they are compared with labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, TrainerCallback, TrainerControl, TrainerState

from kdlib.batching import FeatureDataset, PadCollator, RaggedArray, inference_batches
from kdlib.lm_cache import bf16_autocast
from kdlib.registry import load_pretrained
from kdlib.trainer import DistillationTrainer, quiet_arguments


def load_classifier(name: str, num_labels: int = 2) -> tuple[torch.nn.Module, Any]:
    """(model with a fresh `num_labels`-way head, tokenizer); the head is seeded by the caller."""
    return load_pretrained(name, AutoModelForSequenceClassification, num_labels=num_labels)


def encode(tokenizer: Any, examples: Sequence[dict], max_length: int) -> dict[str, list]:
    """Token ids, attention masks and labels of `{"sentence", "label"}` examples, unpadded."""
    enc = tokenizer([ex["sentence"] for ex in examples], truncation=True, max_length=max_length)
    columns = {k: list(v) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    columns["labels"] = [ex["label"] for ex in examples]
    return columns


@torch.inference_mode()
def forward_all(
    model: torch.nn.Module, columns: dict[str, list], pad_token_id: int, hidden: bool, batch_size: int = 64
) -> dict[str, Any]:
    """Logits (and, if `hidden`, every block's hidden states as fp16 ragged rows) per example."""
    model.eval()
    lengths = [len(ids) for ids in columns["input_ids"]]
    logits: list[np.ndarray | None] = [None] * len(lengths)
    states: list[np.ndarray | None] = [None] * len(lengths)
    inputs = {k: columns[k] for k in ("input_ids", "attention_mask")}
    for rows, batch in inference_batches(model, inputs, pad_token_id, batch_size):
        out = model(**batch, output_hidden_states=hidden)
        for j, i in enumerate(rows):
            logits[i] = out.logits[j].float().cpu().numpy()
            if hidden:
                stacked = torch.stack([h[j, : lengths[i]] for h in out.hidden_states[1:]], dim=1)
                states[i] = stacked.to(torch.float16).cpu().numpy()  # [seq, layers, width]
    result: dict[str, Any] = {"logits": np.stack(logits)}
    if hidden:
        result["hidden"] = RaggedArray.from_rows(states)
    return result


def accuracy(
    model: torch.nn.Module, columns: dict[str, list], pad_token_id: int, bf16: bool = False
) -> float:
    """Percentage of `columns` whose arg-max prediction equals its label (`bf16`: the forward
    passes under bfloat16 autocast, as a model trained that way is run)."""
    with bf16_autocast(bf16, next(model.parameters()).device):
        predicted = forward_all(model, columns, pad_token_id, hidden=False)["logits"].argmax(-1)
    return float(100.0 * np.mean(predicted == np.asarray(columns["labels"])))


class AccuracyCurve(TrainerCallback):
    """A learning curve in accuracy: the model scored on `columns` every `every` optimiser steps
    and after the last, appended to `points` as `{"step", "accuracy"}`.

    Whether a run has reached its plateau is read from such a curve (how much its last steps
    add); the Trainer's own evaluation loop would need an `eval_dataset` and `compute_metrics`
    for each model, and scores with its own batching rather than `accuracy`'s length-sorted one.
    """

    def __init__(self, columns: dict[str, list], pad_token_id: int, every: int, bf16: bool = False) -> None:
        if every < 1:
            raise ValueError(f"AccuracyCurve needs every >= 1 step, got {every}.")
        self.columns, self.pad_token_id, self.every, self.bf16 = columns, pad_token_id, every, bf16
        self.points: list[dict[str, float]] = []

    def on_step_end(
        self,
        args: Any,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            raise ValueError("AccuracyCurve needs the Trainer to pass the model to its callbacks.")
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            was_training = model.training
            self.points.append(
                {
                    "step": state.global_step,
                    "accuracy": accuracy(model, self.columns, self.pad_token_id, self.bf16),
                }
            )
            model.train(was_training)


def tail_gain(points: list[dict[str, float]], share: float = 0.2) -> float | None:
    """Accuracy an `AccuracyCurve` gained over the last `share` of its steps: its last point
    minus the last point at or before (1 - share) of them; None without such a point. A run
    has reached its plateau when this is small."""
    if not points:
        return None
    end = points[-1]["step"]
    before = [p for p in points if p["step"] <= (1 - share) * end]
    return points[-1]["accuracy"] - before[-1]["accuracy"] if before else None


def fine_tune(
    model: torch.nn.Module,
    columns: dict[str, list],
    pad_token_id: int,
    *,
    output_dir: str,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    trainer_class: type[DistillationTrainer] = DistillationTrainer,
    callbacks: list[TrainerCallback] | None = None,
    bf16: bool = False,
) -> DistillationTrainer:
    """`steps` AdamW steps on the gold labels alone (10% warmup, linear decay, length-grouped
    batches; `bf16`: forward passes under bfloat16 autocast, fp32 weights and optimiser);
    returns the trainer, whose `state.log_history` holds the loss curve."""
    args = quiet_arguments(
        output_dir=output_dir,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        max_steps=steps,
        warmup_steps=0.1,
        weight_decay=0.01,
        logging_steps=max(1, steps // 10),
        seed=seed,
        alpha_ce=0.0,
        alpha_task=1.0,
        train_sampling_strategy="group_by_length",
        bf16=bf16,
        # the Trainer refuses bf16 on a machine without CUDA unless told to use the CPU; asked only
        # then, so that a float32 run keeps whatever device the Trainer picks (Apple's MPS included)
        use_cpu=bf16 and not torch.cuda.is_available(),
    )
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=FeatureDataset(columns),
        data_collator=PadCollator(pad_token_id),
        callbacks=callbacks,
    )
    trainer.train()
    return trainer
