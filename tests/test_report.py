import json
import math

import pytest

from kdlib.report import RunRecord, gain_verdict, write_json_atomic


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
