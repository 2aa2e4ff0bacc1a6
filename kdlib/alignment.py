"""Intermediate-layer distillation: which teacher layers, matched to which student layers.

CoFi pruning (Xia et al. 2022) distils teacher layers [2, 5, 8, 11] (TinyBERT's 12 -> 4
choice) into the student layers that imitate them best; RAIL-KD (Haidar et al. 2022) draws the
teacher layers at random every step. This module is those choices as pure functions, for any
depths:

- `select_teacher_layers`: "fixed" (a given list), "uniform" (evenly spaced; [2, 5, 8, 11] for
  4 of 12), "random" (k random layers, sorted: CoFi's version 5 / RAIL-KD), "window" (one random
  layer from each of k equal windows: CoFi's version 6).
- `layer_loss_matrix`: MSE between each chosen teacher layer and each (projected) student
  layer over real tokens, without materialising every pair's difference.
- `align`: "one-to-one" (version 2), "min" (each teacher layer to its least-loss student
  layer; version 3), "ordered" (the same, keeping the order of layers, searched from the top;
  version 4), "reversed" (a control that maps low teacher layers to high student layers).

Where this departs from CoFi's published code, on purpose: the loss is a proper sum (version 2
added to an unset total); random layers stay sorted (version 5 reset the first one to at
least 2 after sorting, which can unsort them); a student layer exists while either its
attention heads or its FFN remain (the code read heads only); and no depth is hard-coded.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

SELECTIONS = ("fixed", "uniform", "random", "window")
MATCHINGS = ("one-to-one", "min", "ordered", "reversed")


def uniform_layers(n_layers: int, k: int) -> list[int]:
    """k evenly spaced layers ending at the top: [2, 5, 8, 11] for k=4 of 12."""
    _check_k(n_layers, k)
    return [round((i + 1) * n_layers / k) - 1 for i in range(k)]


def select_teacher_layers(
    strategy: str,
    n_layers: int,
    k: int,
    *,
    fixed: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """The teacher layers (0-indexed transformer blocks) to distil at this step."""
    if strategy == "fixed":
        layers = list(fixed if fixed is not None else uniform_layers(n_layers, k))
        bad = [layer for layer in layers if not 0 <= layer < n_layers]
        if bad:
            raise ValueError(f"teacher layers {bad} do not exist: the teacher has layers 0..{n_layers - 1}.")
        if sorted(set(layers)) != layers:
            raise ValueError(f"teacher layers {layers} must be distinct and increasing.")
        return layers
    _check_k(n_layers, k)
    if strategy == "uniform":
        return uniform_layers(n_layers, k)
    if strategy == "random":
        return sorted(torch.randperm(n_layers, generator=generator)[:k].tolist())
    if strategy == "window":
        bounds = [round(i * n_layers / k) for i in range(k + 1)]
        return [
            int(lo + torch.randint(hi - lo, (1,), generator=generator).item())
            for lo, hi in zip(bounds[:-1], bounds[1:])
        ]
    raise ValueError(f"strategy = {strategy!r}: choose one of {SELECTIONS}.")


def _check_k(n_layers: int, k: int) -> None:
    if not 1 <= k <= n_layers:
        raise ValueError(f"cannot choose {k} of {n_layers} teacher layers: need 1 <= k <= {n_layers}.")


def existing_layers(
    head_mask: torch.Tensor | None = None, ffn_mask: torch.Tensor | None = None, n_layers: int | None = None
) -> torch.Tensor:
    """Which student layers still compute something: any head or the FFN left (bool [layers]).

    `head_mask` is `[layers, heads]` (nonzero = kept), `ffn_mask` is `[layers]`; with neither,
    all `n_layers` exist.
    """
    if head_mask is None and ffn_mask is None:
        if n_layers is None:
            raise ValueError("give head_mask, ffn_mask or n_layers.")
        return torch.ones(n_layers, dtype=torch.bool)
    parts = []
    if head_mask is not None:
        parts.append((head_mask != 0).any(dim=-1))
    if ffn_mask is not None:
        parts.append(ffn_mask != 0)
    exists = parts[0]
    for part in parts[1:]:
        exists = exists | part
    return exists


def layer_loss_matrix(
    teacher_states: Sequence[torch.Tensor],
    student_states: Sequence[torch.Tensor],
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """`[len(teacher_states), len(student_states)]` MSE, averaged over real tokens and width.

    Student states must already be projected to the teacher's width. Computed in float32
    (float64 if an input is), one teacher layer at a time, with the gradient written out
    (`_PairwiseMSE`): the `[k, m, batch, seq, width]` difference of every pair is never held,
    which at CoFi's shape (4 x 12 layers, 32 x 128 tokens, width 768) is 600 MB per step.
    """
    teacher = torch.stack(list(teacher_states))  # [k, batch, seq, width]
    student = torch.stack(list(student_states))  # [m, batch, seq, width]
    if teacher.shape[1:] != student.shape[1:]:
        raise ValueError(
            f"teacher states {tuple(teacher.shape[1:])} and student states {tuple(student.shape[1:])} "
            "differ: project the student to the teacher's width and tokenise alike."
        )
    dtype = torch.float64 if torch.float64 in (teacher.dtype, student.dtype) else torch.float32
    batch, seq, width = teacher.shape[1:]
    if attention_mask is None:
        weights = torch.full((batch, seq), 1.0 / (batch * seq * width), dtype=dtype, device=teacher.device)
    else:
        mask = attention_mask.to(dtype)
        weights = mask / (width * mask.sum().clamp(min=1))
    return _PairwiseMSE.apply(teacher.to(dtype), student.to(dtype), weights)


class _PairwiseMSE(torch.autograd.Function):
    """M[i, j] = sum over tokens and width of w * (t_i - s_j)^2, `w` a `[batch, seq]` weight.

    Forward: one `[m, batch, seq, width]` difference per teacher layer, squared in place.
    Backward, from dM[i, j]/ds_j = 2 w (s_j - t_i): grad s_j = 2 w (G_j s_j - sum_i g_ij t_i)
    with G_j = sum_i g_ij, and symmetrically for t_i; each is one contraction over the layers.
    """

    @staticmethod
    def forward(ctx, teacher: torch.Tensor, student: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = teacher.new_empty(teacher.shape[0], student.shape[0])
        for i in range(teacher.shape[0]):
            diff = student - teacher[i]
            out[i] = (diff.square_().sum(dim=-1) * weights).sum(dim=(-2, -1))
        ctx.save_for_backward(teacher, student, weights)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        teacher, student, weights = ctx.saved_tensors
        scale = 2 * weights[..., None]  # [batch, seq, 1]
        grad_teacher = grad_student = None
        if ctx.needs_input_grad[0]:  # in place after the first product: two temporaries at most
            grad_teacher = teacher * grad.sum(dim=1)[:, None, None, None]
            grad_teacher.sub_(torch.einsum("km,mbsd->kbsd", grad, student)).mul_(scale)
        if ctx.needs_input_grad[1]:
            grad_student = student * grad.sum(dim=0)[:, None, None, None]
            grad_student.sub_(torch.einsum("km,kbsd->mbsd", grad, teacher)).mul_(scale)
        return grad_teacher, grad_student, None


def align(
    loss_matrix: torch.Tensor, method: str, existing: torch.Tensor | Sequence[bool] | None = None
) -> torch.Tensor:
    """The student layer (index) matched to each chosen teacher layer (row), as a LongTensor.

    Pruned (non-existing) student layers are never matched. "ordered" keeps the layers' order:
    from the top teacher layer down, each takes the least-loss student layer below the one
    chosen above it, leaving enough layers below for the teacher layers still to match (so it
    always succeeds when there are as many existing student layers as teacher layers; CoFi's
    code instead fell back to repeating a layer, or to an index past the last).

    "min" and "ordered" work on the loss matrix's device and never read it back to the host: the
    alignment is made every training step, and a read would stall a GPU each time.
    """
    k, m = loss_matrix.shape
    flags = [True] * m if existing is None else [bool(x) for x in _host_list(existing)]
    if len(flags) != m:
        raise ValueError(f"existing has {len(flags)} entries, expected one per student layer ({m}).")
    available = [j for j, flag in enumerate(flags) if flag]
    if not available:
        raise ValueError("no student layer exists to distil into.")
    exists = _device_mask(tuple(flags), loss_matrix.device)
    if method == "min":
        return loss_matrix.masked_fill(~exists, float("inf")).argmin(dim=1)
    if method in ("one-to-one", "ordered", "reversed") and len(available) < k:
        raise ValueError(
            f"{method!r} matching needs one student layer per teacher layer: {k} teacher layers, "
            f"{len(available)} existing student layers. Choose fewer teacher layers or 'min'."
        )
    if method == "one-to-one":
        return torch.tensor(available[:k])
    if method == "reversed":
        return torch.tensor(available[::-1][:k])
    if method == "ordered":
        return _ordered(loss_matrix, exists)
    raise ValueError(f"method = {method!r}: choose one of {MATCHINGS}.")


@functools.lru_cache(maxsize=64)
def _device_mask(flags: tuple[bool, ...], device: torch.device) -> torch.Tensor:
    """The existing-layer mask on `device`, made once: copying it there every step would, on a
    GPU, wait for the queued work each time. Read only: callers never write to it."""
    return torch.tensor(flags, device=device)


def _host_list(existing: torch.Tensor | Sequence[bool]) -> list:
    if isinstance(existing, torch.Tensor):
        if existing.dim() != 1:
            raise ValueError(f"existing has shape {tuple(existing.shape)}: give one flag per student layer.")
        return existing.tolist()
    return list(existing)


def _ordered(loss_matrix: torch.Tensor, exists: torch.Tensor) -> torch.Tensor:
    """`align`'s "ordered" matching, one masked argmin per teacher layer, from the top down.

    Student layer j may take teacher row r when it exists, lies below the layer chosen for row
    r + 1, and has at least r existing layers below it (one for each row still to match). Ties
    go to the lowest index. Every allowed loss is clamped below +inf, so an allowed layer always
    wins over a disallowed one, even where the losses overflowed.
    """
    k, m = loss_matrix.shape
    index = torch.arange(m, device=loss_matrix.device)
    present = exists.long()
    existing_below = torch.cumsum(present, 0) - present
    finite_max = torch.finfo(loss_matrix.dtype).max
    losses = loss_matrix.nan_to_num(nan=finite_max, posinf=finite_max)
    bound: int | torch.Tensor = m  # the layer chosen for the row above (a tensor from the first row on)
    chosen = []
    for row in range(k - 1, -1, -1):
        allowed = exists & (index < bound) & (existing_below >= row)
        bound = losses[row].masked_fill(~allowed, float("inf")).argmin()
        chosen.append(bound)
    return torch.stack(chosen[::-1])


def aligned_loss(loss_matrix: torch.Tensor, alignment: torch.Tensor) -> torch.Tensor:
    """Sum over the chosen teacher layers of the loss against their matched student layer."""
    rows = torch.arange(loss_matrix.shape[0], device=loss_matrix.device)
    return loss_matrix[rows, alignment.to(loss_matrix.device)].sum()
