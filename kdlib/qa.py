"""Extractive question answering: SQuAD windows in, answer texts and official scores out.

Two testable halves, as in transformers' question-answering example: `prepare_windows` cuts
each (question, context) pair into overlapping windows with offsets and span labels;
`predict_answers` turns start/end logits back into answer texts. `squad_scores` follows the
official SQuAD v1.1 evaluation script's normalisation (lower case, no punctuation, no
articles, single spaces), exact match and token F1, maximised over the gold answers.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Example = Mapping[str, Any]
"""A SQuAD question: `id`, `question`, `context`, `answers` = {"text": [...], "answer_start": [...]}."""


@dataclass
class QAWindows:
    """Tokenised windows of SQuAD examples, one row per window.

    `offsets[i][j]` is the character span of token j in its example's context, or None for
    tokens outside the context (question, special tokens), so answers can only come from
    the context. Span labels point at the answer's tokens, or at position 0 ([CLS]) when the
    window does not hold the whole answer.
    """

    features: dict[str, list[list[int]]]
    example_index: list[int]
    offsets: list[list[tuple[int, int] | None]]
    start_positions: list[int]
    end_positions: list[int]

    def __len__(self) -> int:
        return len(self.example_index)

    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.features["input_ids"]]

    def subset(self, keep: Sequence[int]) -> QAWindows:
        """The windows at positions `keep`, in that order (their example indices unchanged)."""
        return QAWindows(
            {k: [v[i] for i in keep] for k, v in self.features.items()},
            [self.example_index[i] for i in keep],
            [self.offsets[i] for i in keep],
            [self.start_positions[i] for i in keep],
            [self.end_positions[i] for i in keep],
        )


def prepare_windows(examples: Sequence[Example], tokenizer: Any, max_length: int, stride: int) -> QAWindows:
    """Tokenise question + context into windows of at most `max_length` tokens.

    Consecutive windows of one context overlap by `stride` tokens; only the context is cut
    (`only_second`). Raises a ValueError naming the question when a question leaves no room
    for context.
    """
    if stride >= max_length:
        raise ValueError(f"stride ({stride}) must be smaller than max_length ({max_length}).")
    questions = [ex["question"].lstrip() for ex in examples]
    contexts = [ex["context"] for ex in examples]
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    q_lengths = [len(ids) for ids in tokenizer(questions, add_special_tokens=False)["input_ids"]]
    for ex, q_len in zip(examples, q_lengths):
        if q_len + specials + stride >= max_length:
            raise ValueError(
                f"question {ex['id']!r} has {q_len} tokens: with {specials} special tokens and a "
                f"stride of {stride} it leaves no room for context within max_length="
                f"{max_length}; raise max_length or lower stride."
            )
    enc = tokenizer(
        questions,
        contexts,
        truncation="only_second",
        max_length=max_length,
        stride=stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding=False,
    )
    mapping = enc.pop("overflow_to_sample_mapping")
    offset_mapping = enc.pop("offset_mapping")
    starts, ends, offsets = [], [], []
    for i, sample in enumerate(mapping):
        sequence_ids = enc.sequence_ids(i)
        window_offsets = [
            tuple(off) if sid == 1 else None for off, sid in zip(offset_mapping[i], sequence_ids)
        ]
        offsets.append(window_offsets)
        start, end = _answer_tokens(examples[sample], window_offsets)
        starts.append(start)
        ends.append(end)
    features = {key: list(enc[key]) for key in enc.keys()}
    return QAWindows(features, list(mapping), offsets, starts, ends)


def _answer_tokens(example: Example, offsets: list[tuple[int, int] | None]) -> tuple[int, int]:
    """Token span of the first gold answer in this window, or (0, 0) if it is not all inside."""
    answers = example["answers"]
    if not answers["text"]:
        return 0, 0
    start_char = answers["answer_start"][0]
    end_char = start_char + len(answers["text"][0])
    context = [j for j, off in enumerate(offsets) if off is not None]
    first, last = context[0], context[-1]
    if offsets[first][0] > start_char or offsets[last][1] < end_char:
        return 0, 0
    start = first
    while start <= last and offsets[start][0] <= start_char:
        start += 1
    end = last
    while end >= first and offsets[end][1] >= end_char:
        end -= 1
    return start - 1, end + 1


def predict_answers(
    examples: Sequence[Example],
    windows: QAWindows,
    start_logits: Sequence[np.ndarray],
    end_logits: Sequence[np.ndarray],
    n_best: int = 20,
    max_answer_length: int = 30,
) -> dict[str, str]:
    """Best-scoring context span per question over all its windows (SQuAD v1.1: always answer).

    Candidates are the `n_best` highest start and end positions of each window; a span is
    valid when both ends lie in the context, end >= start, and it spans at most
    `max_answer_length` tokens. Its score is start logit + end logit. `start_logits[i]` may be
    longer than window i (padding); positions beyond the window are ignored.
    """
    by_example: dict[int, list[int]] = collections.defaultdict(list)
    for window, example in enumerate(windows.example_index):
        by_example[example].append(window)
    predictions = {}
    for index, example in enumerate(examples):
        best_score, best_text = -np.inf, ""
        for window in by_example.get(index, []):
            offsets = windows.offsets[window]
            n = len(offsets)
            s_logits = np.asarray(start_logits[window][:n], dtype=np.float64)
            e_logits = np.asarray(end_logits[window][:n], dtype=np.float64)
            top_starts = np.argsort(s_logits)[::-1][:n_best]
            top_ends = np.argsort(e_logits)[::-1][:n_best]
            for s in top_starts:
                if offsets[s] is None:
                    continue
                for e in top_ends:
                    if offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                        continue
                    score = s_logits[s] + e_logits[e]
                    if score > best_score:
                        best_score = score
                        best_text = example["context"][offsets[s][0] : offsets[e][1]]
        predictions[example["id"]] = best_text
    return predictions


def normalize_answer(text: str) -> str:
    """The official v1.1 normalisation: lower, drop punctuation, drop a/an/the, squash spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


_PUNCTUATION = set(string.punctuation)


def exact_match(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def f1(prediction: str, truth: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    true_tokens = normalize_answer(truth).split()
    same = sum((collections.Counter(pred_tokens) & collections.Counter(true_tokens)).values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(true_tokens)
    return 2 * precision * recall / (precision + recall)


def per_question_scores(
    predictions: Mapping[str, str], examples: Sequence[Example]
) -> tuple[np.ndarray, np.ndarray]:
    """Exact match and F1 (0-1) per question, each the max over its gold answers.

    As in the official script, a question without a prediction scores zero.
    """
    em, f1_scores = np.zeros(len(examples)), np.zeros(len(examples))
    for i, ex in enumerate(examples):
        pred = predictions.get(ex["id"])
        if pred is None:
            continue
        em[i] = max(exact_match(pred, t) for t in ex["answers"]["text"])
        f1_scores[i] = max(f1(pred, t) for t in ex["answers"]["text"])
    return em, f1_scores


def squad_scores(predictions: Mapping[str, str], examples: Sequence[Example]) -> dict[str, float]:
    """Exact match and F1 in percent over `examples`, as the official v1.1 script reports them."""
    if not examples:
        raise ValueError("squad_scores needs at least one example.")
    em, f1_scores = per_question_scores(predictions, examples)
    return {
        "exact_match": float(100.0 * em.mean()),
        "f1": float(100.0 * f1_scores.mean()),
        "questions": len(examples),
    }
