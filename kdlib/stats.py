"""The statistics behind the chapters' verdicts: seed summaries, paired and unpaired tests.

A comparison over a handful of seeds, or over the same evaluation examples scored by two
models, is only as good as its noise estimate. Each function here returns the estimate with
the number it qualifies, so a chapter can print both and a verdict rule can use both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def seed_summary(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one seed), min and max of per-seed results."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("seed_summary needs at least one value.")
    return {
        "mean": float(x.mean()),
        "std": float(x.std(ddof=1)) if x.size > 1 else 0.0,
        "min": float(x.min()),
        "max": float(x.max()),
    }


def paired_difference(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Mean of `b - a` over the same examples, in percent points, with its standard error.

    `a` and `b` are per-example scores in [0, 1] (SQuAD's exact match or F1 per question).
    """
    if a.shape != b.shape or a.size < 2:
        raise ValueError("paired_difference needs two score arrays over the same >= 2 examples.")
    diff = 100.0 * (b - a)
    return {"mean": float(diff.mean()), "se": float(diff.std(ddof=1) / np.sqrt(diff.size))}


def paired_log_ratio(log_a: Sequence[float], log_b: Sequence[float]) -> dict[str, float]:
    """exp(mean(log_b - log_a)) over paired examples, with its 95% interval.

    With per-example log-likelihoods of the same targets under models a and b, this is the
    ratio of a's perplexity to b's (perplexity = exp(-mean log-likelihood)); the interval is the
    normal one on the mean log difference. `worse_share`: the share of examples on which a gives
    the lower log-likelihood.
    """
    diff = np.asarray(log_b, dtype=float) - np.asarray(log_a, dtype=float)
    if diff.size == 0:
        raise ValueError("paired_log_ratio needs at least one pair.")
    mean = float(diff.mean())
    se = float(diff.std(ddof=1) / math.sqrt(diff.size)) if diff.size > 1 else 0.0
    return {
        "ratio": math.exp(mean),
        "low": math.exp(mean - 1.96 * se),
        "high": math.exp(mean + 1.96 * se),
        "worse_share": float((diff > 0).mean()),
    }


def welch_test(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """mean(a) - mean(b), its standard error, Welch's two-sided p-value (unequal variances) and
    the `confidence` interval of the difference on Welch's degrees of freedom (`low`, `high`).

    For results over a handful of seeds: whether one method's mean differs from another's by
    more than their seed-to-seed noise explains, and by how much it may.
    """
    from scipy import stats

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(x) < 2 or len(y) < 2:
        raise ValueError("welch_test needs at least two values on each side (run more seeds).")
    difference = float(x.mean() - y.mean())
    se = math.sqrt(x.var(ddof=1) / len(x) + y.var(ddof=1) / len(y))
    if se == 0.0:
        p = 1.0 if difference == 0.0 else 0.0
        return {"difference": difference, "se": 0.0, "p": p, "low": difference, "high": difference}
    test = stats.ttest_ind(x, y, equal_var=False)
    low, high = test.confidence_interval(confidence)
    return {
        "difference": difference,
        "se": se,
        "p": float(test.pvalue),
        "low": float(low),
        "high": float(high),
    }


def spread_test(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Whether the methods in `a` vary more across seeds than those in `b`: Brown-Forsythe's test.

    Each side is a list of methods' per-seed values. Each value becomes its absolute deviation
    from its own method's median (so differences between methods' levels do not count as
    spread), and the two sides' deviations are compared with a one-sided two-sample t-test, which
    for two groups is Brown-Forsythe's ANOVA. Unlike an F-test on the variances, it keeps its
    level when a handful of seeds are not normal (one outlying seed). Returns each side's mean
    deviation and pooled standard deviation, the ratio of the deviations and the p-value (None
    when neither side varies or `b` does not).
    """
    from scipy import stats

    def deviations(groups: Sequence[Sequence[float]]) -> np.ndarray:
        if not groups or min(len(g) for g in groups) < 2:
            raise ValueError("spread_test needs at least two seeds per method.")
        return np.concatenate([np.abs(np.asarray(g, dtype=float) - np.median(g)) for g in groups])

    def pooled_std(groups: Sequence[Sequence[float]]) -> float:
        squares = sum(float(((np.asarray(g) - np.mean(g)) ** 2).sum()) for g in groups)
        return math.sqrt(squares / sum(len(g) - 1 for g in groups))

    dev_a, dev_b = deviations(a), deviations(b)
    result: dict[str, Any] = {
        "deviation_a": float(dev_a.mean()),
        "deviation_b": float(dev_b.mean()),
        "std_a": pooled_std(a),
        "std_b": pooled_std(b),
    }
    if dev_b.mean() == 0.0 or (dev_a.var() == 0.0 and dev_b.var() == 0.0):
        return {**result, "ratio": None, "p": None}
    p = stats.ttest_ind(dev_a, dev_b, alternative="greater").pvalue
    return {**result, "ratio": float(dev_a.mean() / dev_b.mean()), "p": float(p)}
