"""kdlib.lm_cache: the teacher's top-k per token, computed in padded batches, cached, reused."""

import numpy as np
import pytest
import torch

from kdlib.cache import TeacherOutputCache
from kdlib.lm import topk_teacher
from kdlib.lm_cache import cached_topk, compute_topk
from tests.test_lm_trainer import llama

ROWS = [[5, 9, 3, 7, 2, 11], [4, 8, 6], [1, 2, 3, 4, 5, 6, 7, 8, 9]]


def test_batched_topk_equals_each_row_alone():
    teacher = llama(2, seed=0).eval()
    found = compute_topk(teacher, ROWS, k=4, temperature=2.0, batch_size=2)  # rows padded together
    for i, row in enumerate(ROWS):
        with torch.no_grad():
            alone = teacher(input_ids=torch.tensor([row])).logits[0]
        indices, values = topk_teacher(alone, 4, 2.0)
        assert found["indices"][i].shape == (len(row), 4) and found["indices"][i].dtype == np.int32
        np.testing.assert_array_equal(found["indices"][i], indices.numpy())
        np.testing.assert_allclose(found["logprobs"][i].astype(np.float32), values.numpy(), atol=2e-3)  # fp16


def test_cache_is_reused_and_keyed_by_k_and_temperature(tmp_path):
    teacher = llama(2, seed=0).eval()
    cache = TeacherOutputCache(tmp_path)
    first, hit = cached_topk(teacher, ROWS, 4, 2.0, cache)
    assert not hit
    again, hit = cached_topk(teacher, ROWS, 4, 2.0, cache)
    assert hit
    for i in range(len(ROWS)):
        np.testing.assert_array_equal(first["indices"][i], again["indices"][i])
        np.testing.assert_array_equal(first["logprobs"][i], again["logprobs"][i])
    assert not cached_topk(teacher, ROWS, 8, 2.0, cache)[1]
    assert not cached_topk(teacher, ROWS, 4, 1.0, cache)[1]
    assert not cached_topk(teacher, ROWS[:2], 4, 2.0, cache)[1]
    assert len(list(tmp_path.glob("*.safetensors"))) == 4


def test_topk_needs_k_below_the_vocabulary():
    from kdlib.config import ConfigError

    with pytest.raises(ConfigError, match="topk = 40"):
        compute_topk(llama(1, seed=0), ROWS, k=40, temperature=2.0)
