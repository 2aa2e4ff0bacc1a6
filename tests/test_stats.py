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
    # t = -1.549 on Welch's 2.94 degrees of freedom: two-sided p = 0.219 (t-table), and the 95%
    # interval -2 +- t(0.975; 2.94) * se, with t(0.975; 2.94) = 3.20 by the same table
    assert result["p"] == pytest.approx(0.219, abs=0.005)
    half = 3.20 * math.sqrt(5 / 3)
    assert (result["low"], result["high"]) == pytest.approx((-2.0 - half, -2.0 + half), abs=0.05)
    same = {"difference": 0.0, "se": 0.0, "p": 1.0, "low": 0.0, "high": 0.0}
    assert welch_test([5.0, 5.0], [5.0, 5.0]) == same
    with pytest.raises(ValueError, match="two values"):
        welch_test([1.0], [1.0, 2.0])


def test_spread_test_compares_deviations_from_each_methods_median():
    from scipy import stats

    # a: medians 2 and 12 -> deviations (1, 0, 1) and (2, 0, 2); b: median 5.5 -> (0.5, 0, 0.5)
    result = spread_test([[1.0, 2.0, 3.0], [10.0, 12.0, 14.0]], [[5.0, 5.5, 6.0]])
    assert result["deviation_a"] == pytest.approx(1.0) and result["deviation_b"] == pytest.approx(1 / 3)
    assert result["ratio"] == pytest.approx(3.0)
    assert result["std_a"] == pytest.approx(math.sqrt((2 + 8) / 4)) and result["std_b"] == pytest.approx(0.5)
    expected = stats.ttest_ind([1, 0, 1, 2, 0, 2], [0.5, 0, 0.5], alternative="greater").pvalue
    assert result["p"] == pytest.approx(expected)  # the one-sided t-test on those deviations
    assert spread_test([[1.0, 3.0]], [[2.0, 2.0]])["ratio"] is None  # no spread to compare with
    # one outlying seed moves a deviation by its distance from the median, a variance by its square
    calm = spread_test([[80.0, 80.5, 81.0, 80.2, 80.8]], [[70.0, 70.5, 71.0, 70.2, 70.8]])
    assert calm["p"] > 0.4
    with pytest.raises(ValueError, match="two seeds"):
        spread_test([[1.0]], [[1.0, 2.0]])
