"""A causal LM teacher's top-k next-token distribution, computed once per token and reused.

A full-vocabulary teacher output costs vocab x 2 bytes per token (98 KB for SmolLM2's 49,152
tokens), too much to keep for a corpus; the k most likely tokens' tempered log-probabilities
(int32 index + float16 value each, 6k bytes) are kept instead, the rest of the mass standing as
one bucket (`kdlib.lm.topk_forward_kl`). Entries live in `TeacherOutputCache` under a key of the
teacher's weights, the exact rows, k, the temperature and the precision, so every student run on
the same rows reads them instead of running the teacher.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch

from kdlib.batching import RaggedArray, inference_batches
from kdlib.cache import TeacherOutputCache, cache_key, model_fingerprint, sequences_fingerprint
from kdlib.lm import topk_teacher


def bf16_autocast(enabled: bool, device: torch.device | str = "cpu") -> contextlib.AbstractContextManager:
    """bfloat16 autocast on `device` when `enabled`, else nothing."""
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


@torch.inference_mode()
def compute_topk(
    teacher: torch.nn.Module,
    rows: Sequence[Sequence[int]],
    k: int,
    temperature: float,
    batch_size: int = 8,
    bf16: bool = False,
) -> dict[str, RaggedArray]:
    """Per row, per token: the teacher's k most likely next tokens and their tempered log-probs."""
    device = next(teacher.parameters()).device
    teacher.eval()
    indices: list[np.ndarray] = [np.empty(0)] * len(rows)
    values: list[np.ndarray] = [np.empty(0)] * len(rows)
    columns = {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]}
    for chunk, batch in inference_batches(teacher, columns, 0, batch_size):
        with bf16_autocast(bf16, device):
            logits = teacher(**batch).logits
        top_i, top_v = topk_teacher(logits.float(), k, temperature)
        for j, i in enumerate(chunk):
            n = len(rows[i])
            indices[i] = top_i[j, :n].cpu().numpy().astype(np.int32)
            values[i] = top_v[j, :n].cpu().numpy().astype(np.float16)
    return {"indices": RaggedArray.from_rows(indices), "logprobs": RaggedArray.from_rows(values)}


def cached_topk(
    teacher: torch.nn.Module,
    rows: Sequence[Sequence[int]],
    k: int,
    temperature: float,
    cache: TeacherOutputCache | None = None,
    batch_size: int = 8,
    bf16: bool = False,
) -> tuple[dict[str, RaggedArray], bool]:
    """`compute_topk`, read from the cache when an entry exists: (arrays, whether it was a hit)."""
    cache = cache or TeacherOutputCache()
    key = cache_key(
        kind="lm-topk",
        teacher=model_fingerprint(teacher),
        rows=sequences_fingerprint(rows),
        k=k,
        temperature=temperature,
        bf16=bf16,
    )

    def compute() -> dict[str, np.ndarray]:
        found = compute_topk(teacher, rows, k, temperature, batch_size, bf16)
        return {
            "indices": found["indices"].values,
            "logprobs": found["logprobs"].values,
            "offsets": found["indices"].offsets,
        }

    hits = cache.hits
    arrays = cache.get_or_compute(key, compute)
    offsets = arrays["offsets"]
    return (
        {
            "indices": RaggedArray(arrays["indices"], offsets),
            "logprobs": RaggedArray(arrays["logprobs"], offsets),
        },
        cache.hits > hits,
    )
