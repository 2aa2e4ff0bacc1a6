"""Seed summaries and the paired and unpaired tests, against values worked out by hand."""

import math

import numpy as np
import pytest

from kdlib.stats import paired_difference, paired_log_ratio, seed_summary, spread_test, welch_test


def test_seed_summary_uses_the_sample_standard_deviation():
    summary = seed_summary([1.0, 2.0, 6.0])
    assert summary == {"mean": 3.0, "std": pytest.approx(math.sqrt(7.0)), "min": 1.0, "max": 6.0}
    assert seed_summary([4.0])["std"] == 0.0  # one seed: no spread, not NaN
    with pytest.raises(ValueError, match="at least one"):
        seed_summary([])


def test_paired_difference():
    a = np.array([0.0, 1.0, 0.0, 1.0])
    b = np.array([1.0, 1.0, 0.0, 1.0])
    diff = paired_difference(a, b)
    assert diff["mean"] == pytest.approx(25.0)
    assert diff["se"] == pytest.approx(100 * np.std([1, 0, 0, 0], ddof=1) / 2)
    with pytest.raises(ValueError, match="same"):
        paired_difference(a, b[:3])


def test_paired_log_ratio_is_a_perplexity_ratio_with_its_interval():
    # model a: log-likelihoods -1, -2, -3 (perplexity e^2); model b: -2, -3, -4 (perplexity e^3)
    a, b = [-1.0, -2.0, -3.0], [-2.0, -3.0, -4.0]
    ratio = paired_log_ratio(b, a)  # b's perplexity over a's: every pair differs by exactly 1
    assert ratio["ratio"] == pytest.approx(math.e)
    assert ratio["low"] == ratio["high"] == pytest.approx(math.e)  # no spread in the differences
    assert ratio["worse_share"] == 1.0
    # differences 0 and 2: mean 1, standard error sqrt(2) / sqrt(2) = 1
    spread = paired_log_ratio([0.0, 0.0], [0.0, 2.0])
    assert spread["ratio"] == pytest.approx(math.e)
    assert spread["low"] == pytest.approx(math.exp(1 - 1.96))
    assert spread["high"] == pytest.approx(math.exp(1 + 1.96))
    assert spread["worse_share"] == 0.5


def test_welch_test_against_hand_computed_values():
    result = welch_test([1.0, 2.0, 3.0], [2.0, 4.0, 6.0])
    assert result["difference"] == pytest.approx(-2.0)
    assert result["se"] == pytest.approx(math.sqrt(1 / 3 + 4 / 3))  # variances 1 and 4, n = 3
    # t = -1.549 on Welch's 2.94 degrees of freedom: two-sided p = 0.219 (t-table)
    assert result["p"] == pytest.approx(0.219, abs=0.005)
    assert welch_test([5.0, 5.0], [5.0, 5.0]) == {"difference": 0.0, "se": 0.0, "p": 1.0}
    with pytest.raises(ValueError, match="two values"):
        welch_test([1.0], [1.0, 2.0])


def test_spread_test_pools_each_methods_own_deviations():
    # a: deviations (-1, 1) and (-2, 2) -> pooled variance 10 / 2 = 5; b: variance 1 on 2 dof
    result = spread_test([[0.0, 2.0], [10.0, 14.0]], [[1.0, 2.0, 3.0]])
    assert result["std_a"] == pytest.approx(math.sqrt(5)) and result["std_b"] == pytest.approx(1.0)
    assert result["ratio"] == pytest.approx(math.sqrt(5))
    assert result["p"] == pytest.approx(1 / 6)  # F(2, 2) survival at 5 is 1 / (1 + 5)
    assert spread_test([[1.0, 3.0]], [[2.0, 2.0]])["ratio"] is None  # no spread to compare with
