"""The book's orchestration: parameters declared, validated before a kernel starts, listed."""

import subprocess
import sys
import time

import pytest

from bookrun.chapters import CHAPTERS, PROFILES
from bookrun.params import check_consistency, declared_parameters, describe, parse_value, resolve
from kdlib.config import ConfigError

CH1 = CHAPTERS["ch1"]


@pytest.mark.parametrize("key", list(CHAPTERS))
def test_parameters_cell_matches_the_config_class(key):
    check_consistency(CHAPTERS[key])


@pytest.mark.parametrize("key", list(CHAPTERS))
@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_file_validates(key, profile):
    values = resolve(CHAPTERS[key], profile)
    assert values["profile"] == profile


def test_parameters_are_documented():
    declared = declared_parameters(CH1)
    assert declared["temperature"]["type"] == "float"
    assert all(info["help"] for info in declared.values()), "every parameter needs a comment"
    text = describe(CH1)
    assert "temperature: float = 2.0" in text and "softmax temperature" in text


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"temprature": 4}, "unknown parameter"),
        ({"temperature": 0}, "temperature"),
        ({"alpha_ce": 2}, "alpha_ce"),
        ({"batch_size": 0}, "batch_size"),
        ({"stride": 500}, "max_length"),
        ({"batch_size": "eight"}, "batch_size.*expected int"),
    ],
)
def test_bad_overrides_stop_before_any_work(overrides, message):
    with pytest.raises(ConfigError, match=message):
        resolve(CH1, "default", overrides)


def test_cli_values_are_read_as_yaml():
    assert parse_value("4") == 4
    assert parse_value("2.5") == 2.5
    assert parse_value("[1, 2]") == [1, 2]
    assert parse_value("minilm-l3") == "minilm-l3"


def test_cli_refuses_bad_parameter_in_seconds_with_exit_code_2(tmp_path):
    started = time.perf_counter()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bookrun",
            "run",
            "ch1",
            "--profile",
            "smoke",
            "-p",
            "temperature",
            "-1",
            "--output-dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "temperature = -1.0 is out of range" in result.stderr
    assert not (tmp_path / "out").exists()
    assert time.perf_counter() - started < 30
