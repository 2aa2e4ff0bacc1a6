"""`DistillationTrainer` for causal language models: distilpythia's `(1 - a) * L_kd + a * L_clm`.

The distillation term is token-level (`kdlib.lm`): forward KL, reverse KL or generalised JSD
against the teacher run on the same batch, or forward KL against a cached top-k teacher (batch
fields `teacher_topk_indices`, `teacher_topk_logprobs`). The CLM term is the next-token
cross-entropy on `labels` (padding labelled -100 by the collator), as the model's own loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState

from kdlib.config import ConfigError, check_choice, check_range
from kdlib.lm import (
    DIVERGENCES,
    TeacherHead,
    body_and_head,
    lm_distillation_loss,
    perplexity,
    token_divergence,
)
from kdlib.trainer import TEACHER_PREFIX, DistillationArguments, DistillationTrainer, forward_inputs

TOPK_FIELDS = ("teacher_topk_indices", "teacher_topk_logprobs")


@dataclass
class LMDistillationArguments(DistillationArguments):
    """`DistillationArguments` plus the divergence; `alpha_ce` = 1 - a, `alpha_task` = a."""

    divergence: str = field(
        default="forward", metadata={"help": "forward (KL(p||q)), reverse (KL(q||p)) or jsd."}
    )
    jsd_beta: float = field(default=0.5, metadata={"help": "Mixture weight beta of the JSD, in (0, 1)."})

    def check_distillation(self) -> None:
        super().check_distillation()
        check_choice("divergence", self.divergence, DIVERGENCES)
        if self.divergence == "jsd":
            check_range(
                "jsd_beta", self.jsd_beta, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False
            )


class LMDistillationTrainer(DistillationTrainer):
    """Distils a causal LM token by token; the student and teacher must share the vocabulary.

    The forward KL and the CLM term are computed together, a block of tokens at a time
    (`kdlib.lm.lm_distillation_loss`), not by the model's own loss: the student is run without
    labels. Reverse KL and JSD are computed whole, beside the blockwise CLM term.

    Under the forward KL an online teacher is run to its last hidden states only, and its
    logits are computed block by block inside the loss (`kdlib.lm.TeacherHead`), when its
    logits are its output layer applied to those states (`kdlib.lm.body_and_head`, checked once
    here); otherwise its whole logits are computed, as for the other divergences.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._teacher_parts = body_and_head(self.teacher) if self.teacher is not None else None
        self._teacher_head_casts: dict[Any, torch.Tensor] = {}  # its output layer under autocast

    def teacher_logits(self, inputs: dict[str, Any]) -> dict[str, Any]:
        if all(name in inputs for name in TOPK_FIELDS):
            return {"topk_indices": inputs[TOPK_FIELDS[0]], "topk_logprobs": inputs[TOPK_FIELDS[1]]}
        cached = any(name.startswith(TEACHER_PREFIX) for name in inputs)
        if self._teacher_parts is None or cached or self.args.divergence != "forward":
            return super().teacher_logits(inputs)
        body, head = self._teacher_parts
        with torch.no_grad(), self.accelerator.autocast():
            hidden = body(**forward_inputs(body, inputs, labels=False)).last_hidden_state
        return {"logits": TeacherHead(hidden, head, self.accelerator.autocast, self._teacher_head_casts)}

    def compute_loss(
        self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False, **kwargs: Any
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """(1 - a) KD + a CLM in one blockwise pass (`kdlib.lm.lm_distillation_loss`); JSD and
        reverse KL through `token_divergence`. Each batch's mean: see `model_accepts_loss_kwargs`."""
        args: LMDistillationArguments = self.args  # type: ignore[assignment]
        if args.alpha_task > 0 and inputs.get("labels") is None:
            raise ValueError(
                f"alpha_task = {args.alpha_task} weighs a next-token loss, but the batch has no "
                "'labels': have the collator add them (the input ids, -100 on padding), or set alpha_task=0."
            )
        outputs = model(**forward_inputs(model, inputs, labels=False))
        student = outputs["logits"]
        mask = inputs.get("attention_mask")
        mask = mask.bool() if mask is not None else None
        teacher = self.teacher_logits(inputs) if args.alpha_ce > 0 else {}
        blockwise_kd = args.divergence == "forward" or "topk_indices" in teacher
        if "topk_indices" in teacher and args.divergence != "forward":
            raise ConfigError(
                f"divergence = {args.divergence!r} needs the teacher's full distribution; a top-k "
                "cache supports forward KL only. Run the teacher online, or use divergence='forward'."
            )
        loss, values = lm_distillation_loss(
            student,
            labels=inputs.get("labels"),
            teacher_logits=_on(teacher.get("logits"), student.device),
            teacher_topk=(
                (teacher["topk_indices"].to(student.device), teacher["topk_logprobs"].to(student.device))
                if "topk_indices" in teacher
                else None
            ),
            temperature=args.temperature,
            mask=mask,
            alpha_ce=args.alpha_ce if blockwise_kd else 0.0,
            alpha_task=args.alpha_task,
        )
        if args.alpha_ce > 0 and not blockwise_kd:
            values["kd"] = token_divergence(
                student,
                teacher["logits"].to(student.device),
                args.temperature,
                mask,
                args.divergence,
                args.jsd_beta,
            )
            loss = loss + args.alpha_ce * values["kd"]
        if model.training:
            terms = {"kd": values["kd"]} if args.alpha_ce > 0 else {}
            if args.alpha_task > 0:
                terms["task"] = values["clm"]
            self._record(**terms, total=loss)
        return (loss, outputs) if return_outputs else loss


def _on(logits: torch.Tensor | TeacherHead | None, device: torch.device) -> torch.Tensor | TeacherHead | None:
    """Teacher logits moved to the student's device (a `TeacherHead` moves each block itself)."""
    return logits.to(device) if isinstance(logits, torch.Tensor) else logits


class PerplexityCurve(TrainerCallback):
    """A learning curve in held-out perplexity: `rows` scored (`kdlib.lm.perplexity`) before the
    first step, every `every` optimiser steps and after the last, appended to `points` as
    `{"step", "perplexity"}`.

    Whether a language model has converged is read from such a curve (how much its last steps
    lower the perplexity); scoring leaves the training itself unchanged (no random numbers are
    drawn, and the model is put back in training mode).
    """

    def __init__(self, rows: list[list[int]], every: int, batch_size: int = 8, bf16: bool = False) -> None:
        if every < 1:
            raise ValueError(f"PerplexityCurve needs every >= 1 step, got {every}.")
        self.rows, self.every, self.batch_size, self.bf16 = rows, every, batch_size, bf16
        self.points: list[dict[str, float]] = []

    def _score(self, step: int, model: torch.nn.Module | None) -> None:
        if model is None:
            raise ValueError("PerplexityCurve needs the Trainer to pass the model to its callbacks.")
        score = perplexity(model, self.rows, self.batch_size, self.bf16)
        self.points.append({"step": step, "perplexity": score["perplexity"]})

    def on_train_begin(
        self,
        args: Any,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        self._score(state.global_step, model)

    def on_step_end(
        self,
        args: Any,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self._score(state.global_step, model)


def relative_tail_drop(points: list[dict[str, float]], share: float = 0.2) -> float | None:
    """How much a `PerplexityCurve` fell over the last `share` of its steps, as a fraction of
    its value at (1 - share) of them (the last point at or before it): 0.02 is 2%. None without
    such a point. A model has converged, for this purpose, when it is small."""
    if not points:
        return None
    end = points[-1]["step"]
    before = [p for p in points if p["step"] <= (1 - share) * end]
    if not before or end == 0:
        return None
    return 1.0 - points[-1]["perplexity"] / before[-1]["perplexity"]
