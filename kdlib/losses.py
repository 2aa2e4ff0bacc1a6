r"""Distillation losses as pure tensor functions.

The soft-target term of Hinton et al. (2015), as DistilBERT uses it:

    L_KD = T^2 * KL( softmax(z_t / T) || softmax(z_s / T) )

The T^2 factor keeps the gradient's scale independent of the temperature (the gradient of the
tempered KL shrinks as 1/T^2), so `alpha` weights mean the same thing at any T.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_REDUCTIONS = ("mean", "sum", "none")


def soft_target_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    *,
    mask: torch.Tensor | None = None,
    class_mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """T^2-scaled KL(teacher || student) between tempered softmaxes over the last dimension.

    Args:
        student_logits, teacher_logits: `[..., C]` logits; the distribution is over `C`.
        temperature: softmax temperature `T > 0`.
        mask: optional bool `[...]`: which rows count (False rows contribute nothing and are
            not in the mean), e.g. padding tokens of a language model.
        class_mask: optional bool `[..., C]`: which classes are part of the distribution (False
            classes get probability zero in both), e.g. padding positions of a QA window.
        reduction: "mean" (over counted rows; KLDivLoss's "batchmean" when every row
            counts), "sum", or "none" (per-row values, zero for masked rows).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}.")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs "
            f"{tuple(teacher_logits.shape)}."
        )
    student = student_logits.float() / temperature
    teacher = teacher_logits.float() / temperature
    if class_mask is not None:
        fill = torch.finfo(student.dtype).min
        student = student.masked_fill(~class_mask, fill)
        teacher = teacher.masked_fill(~class_mask, fill)
    log_q = F.log_softmax(student, dim=-1)
    log_p = F.log_softmax(teacher, dim=-1)
    pointwise = log_p.exp() * (log_p - log_q)
    if class_mask is not None:
        pointwise = pointwise.masked_fill(~class_mask, 0.0)
    per_row = pointwise.sum(dim=-1) * temperature**2
    if mask is not None:
        per_row = per_row.masked_fill(~mask, 0.0)
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    count = per_row.numel() if mask is None else mask.sum()
    return per_row.sum() / torch.clamp(torch.as_tensor(count, device=per_row.device), min=1)


def mix_losses(kd: torch.Tensor, task: torch.Tensor, alpha_ce: float, alpha_task: float) -> torch.Tensor:
    """DistilBERT's weighted sum `alpha_ce * L_KD + alpha_task * L_task`.

    The weights are independent, as in the blog's `alpha_ce` and `alpha_squad`, not forced to
    sum to one. A weight of exactly zero drops its term, so a NaN there cannot leak in.
    """
    for name, alpha in (("alpha_ce", alpha_ce), ("alpha_task", alpha_task)):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {alpha}.")
    total = torch.zeros((), device=kd.device)
    if alpha_ce:
        total = total + alpha_ce * kd
    if alpha_task:
        total = total + alpha_task * task
    return total
