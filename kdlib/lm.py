"""Token-level distillation for causal language models.

Every position of every sequence is one distribution over the shared vocabulary, so the
student imitates the teacher token by token (distilpythia's `(1 - a) * L_kd + a * L_clm`).
Three divergences, as TRL's GKD and DistiLLM offer them, all between the tempered teacher p and
student q and scaled by T^2:

- forward KL(p || q): mass-covering, Hinton's and DistilBERT's choice;
- reverse KL(q || p): mode-seeking;
- generalised Jensen-Shannon, beta * KL(p || m) + (1 - beta) * KL(q || m), m = beta p + (1 - beta) q.

A full-vocabulary teacher output costs vocab x 2 bytes per token to keep; `topk_teacher` keeps
the k most likely tokens' log-probabilities and lets the rest of the mass stand as one bucket,
and `topk_forward_kl` is the forward KL over those k + 1 buckets. How much signal that keeps
must be measured against the full-vocabulary loss, not assumed.

Both forward KLs (the ones training uses) are computed a block of tokens at a time with their
gradient written in the same pass (`_ChunkedForwardKL`): written as plain tensor algebra, autograd
keeps several float32 [tokens x vocab] temporaries alive per step (200 MB each for SmolLM2 at
8 x 128 tokens), and on a CPU allocating and faulting them in costs more than the teacher's
forward pass. Padding tokens are skipped, not computed and masked.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from kdlib.config import ConfigError, check_choice, check_range

DIVERGENCES = ("forward", "reverse", "jsd")


def _masked_mean(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def _kl_from_logs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last axis from log-probabilities; 0 * log 0 counts as 0."""
    return (log_p.exp() * (log_p - log_q)).nan_to_num(nan=0.0).sum(-1)


CHUNK_ELEMENTS = 1 << 20
"""Logits per block of `_ChunkedForwardKL` (4 MB in float32): small enough to stay in cache."""


class _ChunkedForwardKL(torch.autograd.Function):
    """T^2 * mean over kept tokens of KL(p || q), q = softmax(s / T), and its gradient, by blocks.

    `target(rows, log_q)` returns, for the student's log-probabilities `log_q` of the token rows
    `rows`, the per-token KL and its gradient with respect to the tempered logits, q - p. The
    gradient with respect to s is (q - p) / T, so the T^2-scaled loss's is T (q - p) / count; it is
    kept in the logits' own dtype until backward needs it.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, student: torch.Tensor, kept: torch.Tensor, temperature: float, target: Callable
    ) -> torch.Tensor:
        flat = student.reshape(-1, student.shape[-1])
        count = max(int(kept.numel()), 1)
        needs_grad = ctx.needs_input_grad[0]
        grad = None
        if needs_grad:
            grad = flat.new_empty(flat.shape) if kept.numel() == flat.shape[0] else flat.new_zeros(flat.shape)
        total = torch.zeros((), dtype=torch.float32, device=flat.device)
        step = max(1, CHUNK_ELEMENTS // flat.shape[-1])
        for begin in range(0, kept.numel(), step):
            rows = kept[begin : begin + step]
            log_q = F.log_softmax(flat.index_select(0, rows).float().div_(temperature), dim=-1)
            per_token, q_minus_p = target(rows, log_q)
            total += per_token.sum()
            if grad is not None:
                grad.index_copy_(0, rows, q_minus_p.mul_(temperature / count).to(grad.dtype))
        ctx.save_for_backward(grad.view(student.shape) if grad is not None else None)
        return total * (temperature**2 / count)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_output.to(grad.dtype)), None, None, None


def _kept_rows(shape: torch.Size, mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Flat indices of the token rows that count (all of them without a mask)."""
    rows = math.prod(shape[:-1])
    if mask is None:
        return torch.arange(rows, device=device)
    if tuple(mask.shape) != tuple(shape[:-1]):
        raise ValueError(f"mask {tuple(mask.shape)} does not match the logits' tokens {tuple(shape[:-1])}.")
    return mask.reshape(-1).to(device).nonzero().squeeze(-1)


def _full_forward_kl(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, mask: torch.Tensor | None
) -> torch.Tensor:
    teacher_flat = teacher.reshape(-1, teacher.shape[-1])
    floor = torch.finfo(torch.float32).min  # a -inf teacher logit: p = 0 and 0 * log 0 = 0

    def target(rows: torch.Tensor, log_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_p = F.log_softmax(teacher_flat.index_select(0, rows).float().div_(temperature), dim=-1)
        log_p.clamp_min_(floor)
        p = log_p.exp()
        per_token = (p * (log_p - log_q)).sum(-1)
        return per_token, log_q.exp_().sub_(p)

    kept = _kept_rows(student.shape, mask, student.device)
    return _ChunkedForwardKL.apply(student, kept, temperature, target)


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 2.0,
    mask: torch.Tensor | None = None,
    divergence: str = "forward",
    beta: float = 0.5,
) -> torch.Tensor:
    """T^2 times the mean per-token divergence between tempered teacher and student.

    `*_logits`: [..., vocab]; `mask` (same leading shape): which tokens count (real, not padding).
    """
    check_range("temperature", temperature, low=0.0, low_inclusive=False)
    check_choice("divergence", divergence, DIVERGENCES)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ: the models must share the vocabulary."
        )
    if divergence == "forward":
        return _full_forward_kl(student_logits, teacher_logits, temperature, mask)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if divergence == "reverse":
        per_token = _kl_from_logs(log_q, log_p)
    else:
        check_range("jsd_beta", beta, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
        log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1.0 - beta)]), dim=0)
        per_token = beta * _kl_from_logs(log_p, log_m) + (1.0 - beta) * _kl_from_logs(log_q, log_m)
    return temperature**2 * _masked_mean(per_token, mask)


def topk_teacher(
    teacher_logits: torch.Tensor, k: int, temperature: float = 2.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, log-probabilities) of the k most likely tokens at temperature T, per position.

    The rest of the mass, 1 - sum(exp(log-probabilities)), is implied and used as one bucket.
    """
    vocab = teacher_logits.shape[-1]
    if not 1 <= k < vocab:
        raise ConfigError(f"topk = {k}: keep between 1 and {vocab - 1} of the {vocab} tokens.")
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    values, indices = log_p.topk(k, dim=-1)
    return indices, values


def _log1m_exp(log_x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(log_x)) for log_x <= 0, stable at both ends."""
    log_x = log_x.clamp(max=-1e-7)
    return torch.where(log_x > -math.log(2.0), torch.log(-torch.expm1(log_x)), torch.log1p(-torch.exp(log_x)))


def topk_forward_kl(
    student_logits: torch.Tensor,
    indices: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    temperature: float = 2.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """T^2 times the forward KL over the teacher's top-k tokens plus one "rest" bucket.

    Equal to the full-vocabulary forward KL when the top k hold all of the teacher's mass, and a
    lower bound on it otherwise (merging outcomes never increases a KL divergence). It is also
    KL(p~ || q) with p~ the teacher's top k plus its rest mass spread over the other tokens as the
    student spreads its own, so its gradient with respect to the tempered logits is q - p~.
    """
    check_range("temperature", temperature, low=0.0, low_inclusive=False)
    k = indices.shape[-1]
    index_flat = indices.reshape(-1, k)
    log_p_flat = teacher_log_probs.reshape(-1, k)

    def target(rows: torch.Tensor, log_q_all: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = index_flat.index_select(0, rows).long()
        log_p = log_p_flat.index_select(0, rows).float()
        log_q = log_q_all.gather(-1, index)
        log_p_rest = _log1m_exp(torch.logsumexp(log_p, dim=-1))
        log_q_rest = _log1m_exp(torch.logsumexp(log_q, dim=-1))
        head = _kl_from_logs(log_p, log_q)
        rest = (log_p_rest.exp() * (log_p_rest - log_q_rest)).nan_to_num(nan=0.0)
        q = log_q_all.exp_()
        q_minus_p = q.mul_((1.0 - (log_p_rest - log_q_rest).exp())[:, None])  # outside the top k
        q_minus_p.scatter_(-1, index, log_q.exp() - log_p.exp())
        return head + rest, q_minus_p

    kept = _kept_rows(student_logits.shape, mask, student_logits.device)
    return _ChunkedForwardKL.apply(student_logits, kept, temperature, target)


@torch.no_grad()
def perplexity(
    model: torch.nn.Module, rows: list[list[int]], batch_size: int = 8, bf16: bool = False
) -> dict[str, float]:
    """Perplexity of `model` on token rows: exp of the mean next-token NLL over every predicted token.

    Rows are scored independently (no context carried across rows), padded per batch with the
    padding excluded. Returns the perplexity, the mean NLL, the mean entropy of the model's
    next-token distribution (a model more uncertain than it needs to be has entropy above its
    NLL's share of it) and how many tokens were predicted. `bf16` runs the forward pass under
    bfloat16 autocast; the log-softmax is always float32.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, entropy, count = 0.0, 0.0, 0
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    for begin in range(0, len(order), batch_size):
        chunk = [rows[i] for i in order[begin : begin + batch_size]]
        width = max(len(r) for r in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for j, row in enumerate(chunk):
            ids[j, : len(row)] = torch.tensor(row)
            mask[j, : len(row)] = 1
        ids, mask = ids.to(device), mask.to(device)
        with autocast:
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        log_q = F.log_softmax(logits.float(), dim=-1)
        keep = mask[:, 1:].bool()
        nll = -log_q.gather(-1, ids[:, 1:, None]).squeeze(-1)
        total += float(nll[keep].sum())
        entropy += float(-(log_q.exp() * log_q).sum(-1)[keep].sum())
        count += int(keep.sum())
    model.train(was_training)
    if count == 0:
        raise ValueError("no row has two tokens or more: nothing to score.")
    mean = total / count
    return {"perplexity": math.exp(mean), "nll": mean, "entropy": entropy / count, "tokens": count}
