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

Training's loss, `lm_distillation_loss` (forward KL, full or top-k, plus the next-token
cross-entropy), is computed a block of tokens at a time with its gradient written in the same
pass (`_BlockwiseTokenLoss`). Written as plain tensor algebra, autograd keeps several float32
[tokens x vocab] temporaries per term (200 MB each for SmolLM2 at 8 x 128 tokens), and the
model's own loss makes another float32 copy of the logits; on a CPU, allocating and faulting
them in cost more than the teacher's forward pass. Padding tokens are skipped, not computed and
masked.
An online teacher's logits are never held whole either: the teacher runs to its last hidden
states, and its output layer is applied a few hundred tokens at a time as the loss reaches them
(`TeacherHead`), for a teacher whose logits are that layer applied to those states.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kdlib.batching import inference_batches
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
"""Logits per block of `_BlockwiseTokenLoss` (4 MB in float32): small enough to stay in cache."""

TokenTerm = Callable[[torch.Tensor, slice, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""(the flat indices of every token row the loss counts, the block's span of them, the block's
logits in float32, or float64 if given) -> (the term's weighted sum over the block's rows, its
gradient with respect to those logits). A term must not change the logits."""


class _BlockwiseTokenLoss(torch.autograd.Function):
    """The weighted sum of token terms, computed a block of rows at a time, gradient included.

    `terms` maps a name to (weight, term); each term's value is also written to `values` under
    its name. The gradient is kept in the logits' own dtype until backward needs it.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        student: torch.Tensor,
        rows: torch.Tensor,
        terms: dict[str, tuple[float, TokenTerm]],
        values: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        flat = student.reshape(-1, student.shape[-1])
        grad = None
        if ctx.needs_input_grad[0]:
            grad = flat.new_empty(flat.shape) if rows.numel() == flat.shape[0] else flat.new_zeros(flat.shape)
        dtype = torch.promote_types(flat.dtype, torch.float32)  # float32 at least, float64 if given
        sums = {name: torch.zeros((), dtype=dtype, device=flat.device) for name in terms}
        step = max(1, CHUNK_ELEMENTS // flat.shape[-1])
        for begin in range(0, rows.numel(), step):
            span = slice(begin, begin + step)
            block = rows[span]
            logits = flat.index_select(0, block).to(dtype)
            block_grad = None
            for name, (weight, term) in terms.items():
                value, term_grad = term(rows, span, logits)
                sums[name] += value
                term_grad = term_grad.mul_(weight) if weight != 1 else term_grad
                block_grad = term_grad if block_grad is None else block_grad.add_(term_grad)
            if grad is not None and block_grad is not None:
                grad.index_copy_(0, block, block_grad.to(grad.dtype))
        values.update(sums)
        ctx.save_for_backward(grad.view(student.shape) if grad is not None else None)
        total = torch.zeros((), dtype=dtype, device=flat.device)
        for name, (weight, _) in terms.items():
            total += weight * sums[name]
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        if getattr(ctx, "consumed", False):  # the gradient is scaled in place: only once
            raise RuntimeError("a blockwise token loss can be backpropagated once; recompute it.")
        ctx.consumed = True
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_output.to(grad.dtype)), None, None, None


def _blockwise(
    student: torch.Tensor, rows: torch.Tensor, terms: dict[str, tuple[float, TokenTerm]]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    values: dict[str, torch.Tensor] = {}
    total = _BlockwiseTokenLoss.apply(student, rows, terms, values)
    return total, values


def _row_mask(shape: torch.Size, mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Which token rows of `[..., vocab]` logits count, flat (all of them without a mask)."""
    if mask is None:
        return torch.ones(math.prod(shape[:-1]), dtype=torch.bool, device=device)
    if tuple(mask.shape) != tuple(shape[:-1]):
        raise ValueError(f"mask {tuple(mask.shape)} does not match the logits' tokens {tuple(shape[:-1])}.")
    return mask.reshape(-1).to(device).bool()


def _mean_weights(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """1 / count on the rows that count, 0 elsewhere: a term's sum with these is its mean."""
    weights = rows.to(torch.promote_types(like.dtype, torch.float32))
    return weights / weights.sum().clamp_min(1.0)


class TeacherHead:
    """A teacher's token logits, computed from its last hidden states and its output layer a
    few hundred rows at a time as the loss reaches them, so that the `[tokens x vocab]` tensor
    is never held whole (for SmolLM2 at 8 x 128 tokens, 100 MB in bfloat16 against 50 MB for
    one pass). `context` is entered around each pass: the autocast the teacher's forward ran
    under, so the logits are those the whole forward would give.

    Under autocast the output layer's weight is cast to the autocast's type once and kept in
    `casts` (pass the same dict to every step's head): autocast itself would cast a frozen
    weight again at every pass (SmolLM2's: 113 MB read, 57 MB written, each time). A weight
    changed in place is cast afresh.
    """

    ROWS_PER_PASS = 256
    """Rows the output layer is applied to at once. The loss's blocks are a few dozen rows, and
    applying the layer to each alone made chapter 3's online step 1.30x its limit (`python -m
    bench --setting lm`, against 1.06 with the whole logits), when the weight was cast at each
    pass. With the cast kept (2026-12-05, one process, interleaved, 8 x 128 tokens): 128 rows
    1.08x the time limit, 256 1.06x, 512 1.06x; the step's peak of live tensors 1.02x, 1.04x and
    1.09x the next-token step's (1.14x at 512 rows casting once a step)."""

    def __init__(
        self,
        hidden: torch.Tensor,
        head: torch.nn.Module,
        context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        casts: dict[Any, torch.Tensor] | None = None,
    ) -> None:
        self.hidden = hidden.reshape(-1, hidden.shape[-1])
        self.head, self.context = head, context
        self.casts = {} if casts is None else casts
        self.shape = torch.Size((*hidden.shape[:-1], head.weight.shape[0]))

    def _weight(self, dtype: torch.dtype) -> torch.Tensor:
        weight = self.head.weight
        key = (dtype, weight.data_ptr(), weight._version)
        if key not in self.casts:
            self.casts.clear()  # one weight, one cast: an older one is stale
            self.casts[key] = weight.detach().to(dtype)
        return self.casts[key]

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The logits of the given flat token rows, on the device `rows` are on."""
        with torch.no_grad(), self.context():
            hidden = self.hidden.index_select(0, rows.to(self.hidden.device))
            device = hidden.device.type
            if (
                isinstance(self.head, torch.nn.Linear)
                and self.head.weight.dtype == torch.float32  # what autocast would cast
                and torch.is_autocast_enabled(device)
            ):
                dtype = torch.get_autocast_dtype(device)
                bias = None if self.head.bias is None else self.head.bias.to(dtype)
                logits = F.linear(hidden.to(dtype), self._weight(dtype), bias)
            else:
                logits = self.head(hidden)
            return logits.to(rows.device)

    def reader(self) -> Callable[[torch.Tensor, slice], torch.Tensor]:
        """`read(kept, span)`: the logits of rows `kept[span]`, computed `ROWS_PER_PASS` of the
        kept rows at a time from the first block of a pass on (one loss's blocks, in order)."""
        passed: dict[str, Any] = {"start": 0, "stop": 0}

        def read(kept: torch.Tensor, span: slice) -> torch.Tensor:
            start, stop = span.start, min(span.stop, kept.numel())
            if not passed["start"] <= start < stop <= passed["stop"]:
                end = min(kept.numel(), start + max(self.ROWS_PER_PASS, stop - start))
                passed.update(start=start, stop=end, logits=self.rows(kept[start:end]))
            return passed["logits"][start - passed["start"] : stop - passed["start"]]

        return read


def body_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(the model's body, returning its last hidden states; its output layer) when its logits
    are exactly the output layer applied to those states, as checked on a four-token probe
    in float32; None for a model whose forward does more (a logit soft-cap or scale), or whose
    parts cannot be told apart."""
    output_layer = getattr(model, "get_output_embeddings", None)
    body, head = getattr(model, "base_model", model), output_layer() if output_layer else None
    if body is model or not isinstance(head, torch.nn.Linear):
        return None
    device = head.weight.device
    probe = torch.arange(min(4, head.weight.shape[0]), device=device)[None]
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        whole = model(input_ids=probe).logits
        parts = head(body(input_ids=probe).last_hidden_state)
    return (body, head) if torch.allclose(whole, parts, rtol=1e-5, atol=1e-6) else None


def _forward_kl_term(
    teacher: torch.Tensor | TeacherHead, temperature: float, weights: torch.Tensor
) -> TokenTerm:
    """T^2 KL(p || q) against the teacher's full distribution; its gradient is T (q - p)."""
    if isinstance(teacher, TeacherHead):
        teacher_rows = teacher.reader()
    else:
        flat = teacher.reshape(-1, teacher.shape[-1])

        def teacher_rows(kept: torch.Tensor, span: slice) -> torch.Tensor:
            return flat.index_select(0, kept[span])

    floor = torch.finfo(torch.float32).min  # a -inf teacher logit: p = 0 and 0 * log 0 = 0

    def term(kept: torch.Tensor, span: slice, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = weights.index_select(0, kept[span])
        log_q = F.log_softmax(logits / temperature, dim=-1)
        log_p = F.log_softmax(teacher_rows(kept, span).to(logits.dtype).div_(temperature), dim=-1)
        p = log_p.clamp_min_(floor).exp()
        per_token = (p * (log_p - log_q)).sum(-1)
        value = temperature**2 * torch.where(w > 0, per_token * w, 0.0).sum()
        return value, log_q.exp_().sub_(p).mul_((w * temperature)[:, None])

    return term


def _topk_forward_kl_term(
    indices: torch.Tensor, teacher_log_probs: torch.Tensor, temperature: float, weights: torch.Tensor
) -> TokenTerm:
    """T^2 KL over the teacher's top k plus a rest bucket, i.e. KL(p~ || q) with the rest mass
    spread over the other tokens as the student spreads its own; its gradient is T (q - p~)."""
    k = indices.shape[-1]
    index_flat = indices.reshape(-1, k)
    log_p_flat = teacher_log_probs.reshape(-1, k)

    def term(kept: torch.Tensor, span: slice, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = kept[span]
        w = weights.index_select(0, rows)
        index = index_flat.index_select(0, rows).long()
        log_p = log_p_flat.index_select(0, rows).to(logits.dtype)
        log_q_all = F.log_softmax(logits / temperature, dim=-1)
        log_q = log_q_all.gather(-1, index)
        log_p_rest = _log1m_exp(torch.logsumexp(log_p, dim=-1))
        log_q_rest = _log1m_exp(torch.logsumexp(log_q, dim=-1))
        head = _kl_from_logs(log_p, log_q)
        rest = (log_p_rest.exp() * (log_p_rest - log_q_rest)).nan_to_num(nan=0.0)
        value = temperature**2 * torch.where(w > 0, (head + rest) * w, 0.0).sum()
        q_minus_p = log_q_all.exp_().mul_((1.0 - (log_p_rest - log_q_rest).exp())[:, None])
        q_minus_p.scatter_(-1, index, log_q.exp() - log_p.exp())
        return value, q_minus_p.mul_((w * temperature)[:, None])

    return term


def _next_token_term(targets: torch.Tensor, weights: torch.Tensor) -> TokenTerm:
    """Cross-entropy of each row's next token (-100: none); its gradient is softmax - one-hot."""

    def term(kept: torch.Tensor, span: slice, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = kept[span]
        w = weights.index_select(0, rows)
        target = targets.index_select(0, rows).clamp_min(0)[:, None]
        log_q = F.log_softmax(logits, dim=-1)
        value = -(log_q.gather(-1, target).squeeze(-1) * w).sum()
        grad = log_q.exp_()
        grad.scatter_add_(-1, target, torch.full(target.shape, -1.0, dtype=grad.dtype, device=grad.device))
        return value, grad.mul_(w[:, None])

    return term


def _full_forward_kl(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, mask: torch.Tensor | None
) -> torch.Tensor:
    kept = _row_mask(student.shape, mask, student.device)
    term = _forward_kl_term(teacher, temperature, _mean_weights(kept, student))
    return _blockwise(student, kept.nonzero().squeeze(-1), {"kd": (1.0, term)})[0]


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """Each position's next label (the last position has none, -100): what a causal LM predicts."""
    return torch.cat([labels[..., 1:], labels.new_full((*labels.shape[:-1], 1), -100)], dim=-1)


def lm_distillation_loss(
    student_logits: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | TeacherHead | None = None,
    teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
    temperature: float = 2.0,
    mask: torch.Tensor | None = None,
    alpha_ce: float = 0.5,
    alpha_task: float = 0.5,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """distilpythia's `(1 - a) L_kd + a L_clm` in one pass over the student's logits
    (`alpha_ce` = 1 - a, `alpha_task` = a: the same two weights as every kdlib loss).

    L_kd is the forward KL against the teacher's logits (a tensor, or a `TeacherHead` that
    computes them a block at a time) or its cached top k (`(indices,
    log-probabilities)`), over the tokens `mask` keeps; L_clm the cross-entropy of each next
    label (`labels` as a causal LM takes them, -100 where none), as the model's own loss is.
    Returns the weighted total and each term's value ("kd", "clm"). A weight of 0 drops its term.
    """
    check_range("temperature", temperature, low=0.0, low_inclusive=False)
    kd_rows = _row_mask(student_logits.shape, mask, student_logits.device)
    rows = torch.zeros_like(kd_rows)
    terms: dict[str, tuple[float, TokenTerm]] = {}
    if alpha_ce:
        weights = _mean_weights(kd_rows, student_logits)
        if teacher_topk is not None:
            terms["kd"] = (alpha_ce, _topk_forward_kl_term(*teacher_topk, temperature, weights))
        elif teacher_logits is not None:
            if teacher_logits.shape != student_logits.shape:
                raise ValueError(
                    f"student logits {tuple(student_logits.shape)} and teacher logits "
                    f"{tuple(teacher_logits.shape)} differ: the models must share the vocabulary."
                )
            terms["kd"] = (alpha_ce, _forward_kl_term(teacher_logits, temperature, weights))
        else:
            raise ValueError("alpha_ce > 0 needs teacher_logits or teacher_topk.")
        rows |= kd_rows
    if alpha_task:
        if labels is None:
            raise ValueError("alpha_task > 0 needs the labels the next-token loss is computed on.")
        targets = next_token_targets(labels).reshape(-1).to(student_logits.device)
        has_target = targets != -100
        terms["clm"] = (alpha_task, _next_token_term(targets, _mean_weights(has_target, student_logits)))
        rows |= has_target
    return _blockwise(student_logits, rows.nonzero().squeeze(-1), terms)


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
    kept = _row_mask(student_logits.shape, mask, student_logits.device)
    term = _topk_forward_kl_term(indices, teacher_log_probs, temperature, _mean_weights(kept, student_logits))
    return _blockwise(student_logits, kept.nonzero().squeeze(-1), {"kd": (1.0, term)})[0]


@torch.no_grad()
def perplexity(
    model: torch.nn.Module, rows: list[list[int]], batch_size: int = 8, bf16: bool = False
) -> dict[str, Any]:
    """Perplexity of `model` on token rows: exp of the mean next-token NLL over every predicted token.

    Rows are scored independently (no context carried across rows), padded per batch with the
    padding excluded. Returns the perplexity, the mean NLL, the mean entropy of the model's
    next-token distribution (a model more uncertain than it needs to be has entropy above its
    NLL's share of it) and how many tokens were predicted. `bf16` runs the forward pass under
    bfloat16 autocast; the log-softmax is always float32.

    Each row's mean NLL (`row_nll`, in the rows' order) lets two models be compared row by row
    (`kdlib.stats.paired_log_ratio`), and gives the perplexity a 95% interval over rows
    (`perplexity_low`, `perplexity_high`: exp of the token-weighted mean NLL plus or minus 1.96
    standard errors of the per-row means; for rows of equal length, such as packed blocks, the
    two means are the same).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, entropy, count = 0.0, 0.0, 0
    row_nll: list[float | None] = [None] * len(rows)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    columns = {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]}
    for order, batch in inference_batches(model, columns, 0, batch_size):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        with autocast:
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        log_q = F.log_softmax(logits.float(), dim=-1)
        keep = mask[:, 1:].bool()
        nll = -log_q.gather(-1, ids[:, 1:, None]).squeeze(-1)
        per_row = (nll * keep).sum(-1) / keep.sum(-1).clamp(min=1)
        for i, value, predicted in zip(order, per_row.tolist(), keep.any(-1).tolist()):
            row_nll[int(i)] = value if predicted else None
        total += float(nll[keep].sum())
        entropy += float(-(log_q.exp() * log_q).sum(-1)[keep].sum())
        count += int(keep.sum())
    model.train(was_training)
    if count == 0:
        raise ValueError("no row has two tokens or more: nothing to score.")
    mean = total / count
    scored = np.asarray([v for v in row_nll if v is not None])
    half = 1.96 * float(scored.std(ddof=1) / math.sqrt(scored.size)) if scored.size > 1 else 0.0
    return {
        "perplexity": math.exp(mean),
        "perplexity_low": math.exp(mean - half),
        "perplexity_high": math.exp(mean + half),
        "nll": mean,
        "entropy": entropy / count,
        "tokens": count,
        "row_nll": row_nll,
    }
