"""`DistillationTrainer` for causal language models: distilpythia's `(1 - a) * L_kd + a * L_clm`.

The distillation term is token-level (`kdlib.lm`): forward KL, reverse KL or generalised JSD
against the teacher run on the same batch, or forward KL against a cached top-k teacher (batch
fields `teacher_topk_indices`, `teacher_topk_logprobs`). The CLM term is the model's own
next-token cross-entropy on `labels` (padding labelled -100 by the collator).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kdlib.config import ConfigError, check_choice, check_range
from kdlib.lm import DIVERGENCES, token_divergence, topk_forward_kl
from kdlib.trainer import DistillationArguments, DistillationTrainer

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
    """Distils a causal LM token by token; the student and teacher must share the vocabulary."""

    def teacher_logits(self, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        if all(name in inputs for name in TOPK_FIELDS):
            return {"topk_indices": inputs[TOPK_FIELDS[0]], "topk_logprobs": inputs[TOPK_FIELDS[1]]}
        return super().teacher_logits(inputs)

    def distillation_loss(
        self, student_outputs: Any, teacher: dict[str, torch.Tensor], inputs: dict[str, Any]
    ) -> torch.Tensor:
        args: LMDistillationArguments = self.args  # type: ignore[assignment]
        mask = inputs.get("attention_mask")
        mask = mask.bool() if mask is not None else None
        student = student_outputs["logits"]
        if "topk_indices" in teacher:
            if args.divergence != "forward":
                raise ConfigError(
                    f"divergence = {args.divergence!r} needs the teacher's full distribution; a top-k "
                    "cache supports forward KL only. Run the teacher online, or use divergence='forward'."
                )
            indices = teacher["topk_indices"].to(student.device)
            log_probs = teacher["topk_logprobs"].to(student.device)
            return topk_forward_kl(student, indices, log_probs, args.temperature, mask)
        return token_divergence(
            student,
            teacher["logits"].to(student.device),
            args.temperature,
            mask,
            args.divergence,
            args.jsd_beta,
        )
