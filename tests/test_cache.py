"""The teacher-output cache: computed once, keyed by everything that matters, never stale."""

import numpy as np
import torch

from kdlib.cache import TeacherOutputCache, cache_key, model_fingerprint, sequences_fingerprint


def test_computes_once_then_reads(tmp_path):
    cache = TeacherOutputCache(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return {"logits": np.arange(6, dtype=np.float32).reshape(2, 3)}

    first = cache.get_or_compute("k1", compute)
    second = cache.get_or_compute("k1", compute)
    assert len(calls) == 1
    assert (cache.hits, cache.misses) == (1, 1)
    np.testing.assert_array_equal(first["logits"], second["logits"])


def test_corrupt_entry_is_recomputed_not_read(tmp_path):
    cache = TeacherOutputCache(tmp_path)
    cache.store("k", {"x": np.ones(100, np.float32)})
    path = cache.path("k")
    path.write_bytes(path.read_bytes()[:40])  # truncated, as by a killed writer
    assert cache.load("k") is None
    assert not path.exists()
    out = cache.get_or_compute("k", lambda: {"x": np.zeros(3, np.float32)})
    np.testing.assert_array_equal(out["x"], np.zeros(3))


def test_entry_under_another_key_is_not_trusted(tmp_path):
    cache = TeacherOutputCache(tmp_path)
    cache.store("a", {"x": np.ones(2, np.float32)})
    cache.path("a").rename(cache.path("b"))  # e.g. copied by hand under a wrong name
    assert cache.load("b") is None


def test_no_temporary_files_left_behind(tmp_path):
    cache = TeacherOutputCache(tmp_path)
    cache.store("k", {"x": np.ones(2, np.float32)})
    assert [p.name for p in tmp_path.iterdir()] == ["k.safetensors"]


def test_sequences_fingerprint_sees_every_change():
    base = sequences_fingerprint([[1, 2, 3], [4, 5]])
    assert base == sequences_fingerprint([[1, 2, 3], [4, 5]])
    assert base != sequences_fingerprint([[1, 2, 3], [4, 6]])
    assert base != sequences_fingerprint([[1, 2], [3, 4, 5]])  # same tokens, other split
    assert base != sequences_fingerprint([[4, 5], [1, 2, 3]])  # order matters


def test_model_fingerprint_changes_with_any_weight(tiny_qa_pair):
    teacher, _ = tiny_qa_pair
    before = model_fingerprint(teacher)
    assert before == model_fingerprint(teacher)
    with torch.no_grad():
        teacher.qa_outputs.bias[0] += 1e-6
    assert model_fingerprint(teacher) != before


def test_cache_key_is_order_independent_and_sensitive():
    assert cache_key(a=1, b="x") == cache_key(b="x", a=1)
    assert cache_key(a=1, b="x") != cache_key(a=2, b="x")
