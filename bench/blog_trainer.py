"""The reference the benchmark measures `kdlib` against: the blog's `DistillationTrainer`.

Re-implemented from Tunstall's weeknotes (the post chapter 1 reproduces): a `Trainer` whose
`compute_loss` runs the student, then the teacher in full precision under `no_grad` on the same
inputs (labels included) at every step of every epoch, and mixes

    alpha_ce * T^2 * (KL_batchmean(start) + KL_batchmean(end)) / 2 + alpha_squad * L_squad

over all positions of the fixed-length windows, padding included, as the post's preprocessing
(padding to `max_length`) hands them over. Nothing here is used by the book.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer


class BlogDistillationTrainer(Trainer):
    def __init__(
        self,
        *args: Any,
        teacher_model: nn.Module,
        temperature: float,
        alpha_ce: float,
        alpha_squad: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = teacher_model.to(self.args.device)
        self.teacher.eval()
        self.temperature, self.alpha_ce, self.alpha_squad = temperature, alpha_ce, alpha_squad

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        outputs_stu = model(**inputs)
        loss = outputs_stu.loss
        with torch.no_grad():
            outputs_tea = self.teacher(**inputs)
        t = self.temperature
        kl = nn.KLDivLoss(reduction="batchmean")
        loss_start = (
            kl(
                F.log_softmax(outputs_stu.start_logits / t, dim=-1),
                F.softmax(outputs_tea.start_logits / t, dim=-1),
            )
            * t**2
        )
        loss_end = (
            kl(
                F.log_softmax(outputs_stu.end_logits / t, dim=-1),
                F.softmax(outputs_tea.end_logits / t, dim=-1),
            )
            * t**2
        )
        loss = self.alpha_ce * (loss_start + loss_end) / 2.0 + self.alpha_squad * loss
        return (loss, outputs_stu) if return_outputs else loss


class FixedLengthCollator:
    """Every window padded to `max_length`, as the post's tokenisation (`padding="max_length"`) did."""

    def __init__(self, pad_token_id: int, max_length: int) -> None:
        self.pad_token_id, self.max_length = pad_token_id, max_length

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {}
        for name in rows[0]:
            if name.startswith("teacher_"):
                continue
            values = [row[name] for row in rows]
            if isinstance(values[0], (int, float)) or getattr(values[0], "ndim", 1) == 0:
                batch[name] = torch.tensor(values)
                continue
            pad = self.pad_token_id if name == "input_ids" else 0
            out = torch.full((len(rows), self.max_length), pad, dtype=torch.long)
            for i, value in enumerate(values):
                out[i, : len(value)] = torch.as_tensor(value)
            batch[name] = out
        return batch
