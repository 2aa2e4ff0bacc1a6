import json
import math

import pytest

from kdlib.report import RunRecord, gain_verdict, spread_test, welch_test, write_json_atomic


@pytest.mark.parametrize(
    "mean, se, improved, seeds, verdict",
    [
        (2.0, 0.5, 3, 3, "reproduced"),
        (2.0, 0.5, 2, 3, "inconclusive"),  # one seed went the other way
        (0.8, 0.5, 3, 3, "inconclusive"),  # within two standard errors
        (0.0, 0.5, 0, 3, "not reproduced"),
        (-1.5, 0.5, 0, 3, "not reproduced"),
    ],
)
def test_gain_verdict(mean, se, improved, seeds, verdict):
    assert gain_verdict(mean, se, improved, seeds) == verdict


def test_atomic_write_refuses_nan_and_leaves_nothing(tmp_path):
    target = tmp_path / "metrics.json"
    with pytest.raises(ValueError):
        write_json_atomic(target, {"f1": math.nan})
    assert list(tmp_path.iterdir()) == []


def test_record_refuses_non_finite_results_naming_them(tmp_path):
    record = RunRecord("chX", "smoke", {})
    record["results"]["student"] = {"f1": float("inf")}
    with pytest.raises(ValueError, match=r"metrics.results.student.f1"):
        record.write(tmp_path / "metrics.json")
    assert not (tmp_path / "metrics.json").exists()


def test_record_adds_provenance(tmp_path):
    record = RunRecord("chX", "smoke", {"temperature": 2.0})
    data = json.loads(record.write(tmp_path / "m.json").read_text())
    assert data["parameters"] == {"temperature": 2.0}
    assert {"wall_time_s", "peak_memory_mb", "versions", "hardware"} <= set(data)


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
