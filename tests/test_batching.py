"""Per-batch padding, and cached teacher arrays cut to each row's length."""

import numpy as np
import pytest
import torch

from kdlib.batching import FeatureDataset, PadCollator


def test_rows_are_padded_to_the_longest_in_the_batch():
    ds = FeatureDataset(
        {"input_ids": [[5, 6, 7], [8]], "attention_mask": [[1, 1, 1], [1]], "start_positions": [2, 0]},
        extra={"teacher_start_logits": np.arange(10, dtype=np.float32).reshape(2, 5)},
    )
    row = ds[1]
    assert list(row["teacher_start_logits"]) == [5.0]  # cut to the row's own length
    batch = PadCollator(pad_token_id=0)([ds[0], ds[1]])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["start_positions"].tolist() == [2, 0]
    assert batch["teacher_start_logits"].dtype == torch.float32
    assert batch["teacher_start_logits"].tolist() == [[0.0, 1.0, 2.0], [5.0, 0.0, 0.0]]


def test_pad_id_is_the_tokenizers():
    batch = PadCollator(pad_token_id=1)([{"input_ids": [3]}, {"input_ids": [3, 4]}])
    assert batch["input_ids"].tolist() == [[3, 1], [3, 4]]


def test_mismatched_columns_are_refused():
    with pytest.raises(ValueError, match="differ in length"):
        FeatureDataset({"input_ids": [[1], [2]], "start_positions": [0]})
    with pytest.raises(ValueError, match="teacher_x"):
        FeatureDataset({"input_ids": [[1], [2]]}, extra={"teacher_x": np.zeros((3, 1))})


def test_ragged_rows_pad_with_their_trailing_dimensions():
    from kdlib.batching import RaggedArray

    rows = [np.ones((3, 2, 4), np.float16), np.full((1, 2, 4), 2, np.float16)]
    ragged = RaggedArray.from_rows(rows)
    assert len(ragged) == 2 and ragged[1].shape == (1, 2, 4)
    ds = FeatureDataset({"input_ids": [[1, 2, 3], [4]]}, extra={"teacher_hidden": ragged})
    batch = PadCollator(0)([ds[0], ds[1]])
    assert batch["teacher_hidden"].shape == (2, 3, 2, 4)
    assert batch["teacher_hidden"][1, 0].eq(2).all() and batch["teacher_hidden"][1, 1:].eq(0).all()
    with pytest.raises(ValueError, match="offsets"):
        RaggedArray(np.zeros((3, 1)), np.array([0, 2]))
