"""A question-answering teacher's part in distillation: its span logits, computed once.

The teacher scores every window once; its start and end logits are cached under a key of its
weights, the exact input ids and the precision, and travel with the training windows as
`teacher_start_logits` / `teacher_end_logits` columns, which `DistillationTrainer` reads in
place of a teacher forward pass. The same `span_logits` pass scores any QA model for evaluation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import AutoModelForQuestionAnswering

from kdlib import qa
from kdlib.batching import FeatureDataset, inference_batches
from kdlib.cache import TeacherOutputCache, cache_key, model_fingerprint, sequences_fingerprint
from kdlib.config import check_choice
from kdlib.lm_cache import bf16_autocast
from kdlib.registry import load_pretrained

PRECISIONS = ("float32", "bfloat16")
"""How the teacher's one pass may run: float32, or under bfloat16 autocast."""


def load_qa_model(name: str) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) for a registry name, folder or hub id, as a float32 QA model."""
    return load_pretrained(name, AutoModelForQuestionAnswering)


@torch.inference_mode()
def span_logits(
    model: torch.nn.Module, windows: qa.QAWindows, pad_token_id: int, batch_size: int = 32
) -> dict[str, np.ndarray]:
    """Start and end logits `[windows, max_len]` (padding: 0), batched by similar length."""
    model.eval()
    lengths = windows.lengths()
    out = {
        k: np.zeros((len(windows), max(lengths)), dtype=np.float32) for k in ("start_logits", "end_logits")
    }
    for rows, batch in inference_batches(model, windows.features, pad_token_id, batch_size):
        outputs = model(**batch)
        for key in out:
            logits = outputs[key].float().cpu().numpy()
            for j, i in enumerate(rows):
                out[key][i, : lengths[i]] = logits[j, : lengths[i]]
    return out


def teacher_span_logits(
    teacher: torch.nn.Module,
    windows: qa.QAWindows,
    pad_token_id: int,
    cache: TeacherOutputCache,
    precision: str = "float32",
) -> dict[str, np.ndarray]:
    """The teacher's span logits for these windows, from the cache or computed once into it.

    `precision` "bfloat16" runs the pass under bfloat16 autocast (2.7x faster on the benchmark's
    CPU, logits within about 0.1 of float32's); the logits are stored in float32 either way, under
    a key that names the precision.
    """
    check_choice("teacher_precision", precision, PRECISIONS)
    key = cache_key(
        kind="qa-span-logits",
        teacher=model_fingerprint(teacher),
        inputs={name: sequences_fingerprint(col) for name, col in sorted(windows.features.items())},
        precision=precision,
    )
    device = next(teacher.parameters()).device

    def compute() -> dict[str, np.ndarray]:
        with torch.inference_mode(), bf16_autocast(precision == "bfloat16", device):
            return span_logits(teacher, windows, pad_token_id)

    return cache.get_or_compute(key, compute)


def window_dataset(
    windows: qa.QAWindows, teacher_logits: dict[str, np.ndarray] | None = None
) -> FeatureDataset:
    """The windows as training rows (ids, masks, gold span), with the teacher's logits if given."""
    columns = dict(windows.features)
    columns["start_positions"] = windows.start_positions
    columns["end_positions"] = windows.end_positions
    extra = {f"teacher_{k}": v for k, v in (teacher_logits or {}).items()}
    return FeatureDataset(columns, extra)
