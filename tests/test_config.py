"""Parameters are checked by name, type and range before any work starts."""

import pytest

from bookrun.chapters import CHAPTERS
from bookrun.params import chapter_config, chapter_defaults
from experiments.ch1_distilbert_squad import SquadDistillationConfig
from kdlib.config import ConfigError, from_mapping, from_namespace

CH1, CH2 = CHAPTERS["ch1"], CHAPTERS["ch2"]


def test_defaults_are_valid():
    cfg = chapter_config(CH1)
    assert cfg.temperature == 2.0 and cfg.train_seeds == [0, 1]  # as the parameters cell writes them


def test_a_default_lives_in_the_parameters_cell_only():
    with pytest.raises(ConfigError, match=r"needs a value for \['profile'"):
        from_mapping(SquadDistillationConfig, {})  # the class sets no default of its own
    assert chapter_config(CH1, temperature=4).temperature == 4.0


@pytest.mark.parametrize(
    "values, culprit",
    [
        ({"temperature": 0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"alpha_ce": 1.2}, "alpha_ce"),
        ({"alpha_squad": -0.5}, "alpha_squad"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_length": 64, "stride": 64}, "max_length"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"warmup_ratio": 1.0}, "warmup_ratio"),
        ({"split": "train"}, "split"),
        ({"profile": "huge"}, "profile"),
        ({"alpha_ce": 0.0, "alpha_squad": 0.0}, "alpha_ce and alpha_squad"),
        ({"train_seeds": []}, "train_seeds"),
        ({"train_seeds": [1, 1]}, "train_seeds"),
        ({"train_seeds": [-1]}, "train_seeds"),
    ],
)
def test_out_of_range_values_name_the_parameter(values, culprit):
    with pytest.raises(ConfigError, match=culprit):
        chapter_config(CH1, **values)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown parameter\(s\) \['temprature'\].*temperature"):
        chapter_config(CH1, temprature=2.0)


@pytest.mark.parametrize(
    "values, culprit",
    [
        ({"temperature": "hot"}, "temperature.*expected float"),
        ({"batch_size": 8.5}, "batch_size.*expected int"),
        ({"batch_size": True}, "batch_size.*expected int"),
        ({"heldout_articles": [1, "x"]}, "heldout_articles"),
        ({"teacher": 3}, "teacher.*expected str"),
    ],
)
def test_wrong_types_name_the_parameter_and_the_type(values, culprit):
    with pytest.raises(ConfigError, match=culprit):
        chapter_config(CH1, **values)


def test_int_is_accepted_for_float_and_converted():
    cfg = chapter_config(CH1, temperature=4)
    assert cfg.temperature == 4.0 and isinstance(cfg.temperature, float)


def test_from_namespace_takes_exactly_the_fields():
    namespace = chapter_defaults(CH1)
    namespace["unrelated_global"] = object()
    assert from_namespace(SquadDistillationConfig, namespace) == chapter_config(CH1)
    del namespace["stride"]
    with pytest.raises(ConfigError, match="stride"):
        from_namespace(SquadDistillationConfig, namespace)


@pytest.mark.parametrize(
    "values, culprit",
    [
        ({"strategies": ["fixed-min", "best"]}, "strategies"),
        ({"strategies": []}, "strategies"),
        ({"strategies": ["kd-only", "kd-only"]}, "twice"),
        ({"teacher_layers": [5, 2]}, "teacher_layers"),
        ({"teacher_layers": [-1, 2]}, "teacher_layers"),
        ({"layer_weight": 1.1}, "layer_weight"),
        ({"alpha_ce": -0.1}, "alpha_ce"),
        ({"train_seeds": []}, "train_seeds"),
        ({"removed_layers": [-2]}, "removed_layers"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_layer_config_names_the_bad_value(values, culprit):
    with pytest.raises(ConfigError, match=culprit):
        chapter_config(CH2, **values)


@pytest.mark.parametrize("bf16", [False, True])
def test_ch1_bf16_reaches_the_students_trainer_arguments(tmp_path, bf16):
    from types import SimpleNamespace

    import torch

    from experiments.ch1_distilbert_squad import student_arguments

    cfg = chapter_config(CH1, bf16=bf16, output_dir=str(tmp_path))
    data = SimpleNamespace(train=[None] * 64, curve=None)  # what the arguments read of the windows
    args = student_arguments(cfg, data, "student_distilled/seed0", 0, True)
    assert args.bf16 is bf16
    # a CPU trains under bf16 only with use_cpu set; float32 runs leave the device to the Trainer
    assert args.use_cpu is (bf16 and not torch.cuda.is_available())
