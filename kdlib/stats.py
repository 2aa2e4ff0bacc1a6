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


def welch_test(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """mean(a) - mean(b), its standard error, and Welch's two-sided p-value (unequal variances).

    For results over a handful of seeds: whether one method's mean differs from another's by
    more than their seed-to-seed noise explains.
    """
    from scipy import stats

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(x) < 2 or len(y) < 2:
        raise ValueError("welch_test needs at least two values on each side (run more seeds).")
    difference = float(x.mean() - y.mean())
    se = math.sqrt(x.var(ddof=1) / len(x) + y.var(ddof=1) / len(y))
    if se == 0.0:
        return {"difference": difference, "se": 0.0, "p": 1.0 if difference == 0.0 else 0.0}
    return {"difference": difference, "se": se, "p": float(stats.ttest_ind(x, y, equal_var=False).pvalue)}


def spread_test(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Whether the methods in `a` vary more across seeds than those in `b` (one-sided F-test).

    Each side is a list of methods' per-seed values; each method is centred on its own mean and
    the squared deviations pooled, so differences between methods' means do not count as spread.
    Returns the pooled standard deviations, their ratio and the p-value (None when `b` has no
    spread at all).
    """
    from scipy import stats

    def pooled(groups: Sequence[Sequence[float]]) -> tuple[float, int]:
        squares = sum(float(((np.asarray(g) - np.mean(g)) ** 2).sum()) for g in groups)
        dof = sum(len(g) - 1 for g in groups)
        if dof < 1:
            raise ValueError("spread_test needs at least two seeds per method.")
        return squares / dof, dof

    (var_a, dof_a), (var_b, dof_b) = pooled(a), pooled(b)
    result: dict[str, Any] = {"std_a": math.sqrt(var_a), "std_b": math.sqrt(var_b)}
    if var_b == 0.0:
        return {**result, "ratio": None, "p": None}
    ratio = var_a / var_b
    return {**result, "ratio": math.sqrt(ratio), "p": float(stats.f.sf(ratio, dof_a, dof_b))}
