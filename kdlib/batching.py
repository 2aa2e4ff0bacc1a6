"""Variable-length examples in, padded tensor batches out, with cached teacher outputs alongside.

Windows are kept at their own length and padded per batch (to the longest in it), so a batch of
short windows costs less than one padded to the maximum. Per-token arrays such as cached
teacher logits are padded the same way and masked out by the loss.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch


class RaggedArray:
    """Rows of different lengths stored end to end: `values[offsets[i]:offsets[i + 1]]`.

    Per-token teacher outputs (e.g. hidden states `[tokens, layers, width]`) kept this way cost
    no padding, which for short sentences is most of a padded array.
    """

    def __init__(self, values: np.ndarray, offsets: np.ndarray) -> None:
        if offsets.ndim != 1 or offsets[0] != 0 or offsets[-1] != len(values):
            raise ValueError("offsets must start at 0 and end at len(values).")
        self.values, self.offsets = values, offsets

    @classmethod
    def from_rows(cls, rows: Sequence[np.ndarray]) -> RaggedArray:
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(r) for r in rows])
        return cls(np.concatenate(rows), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> np.ndarray:
        return self.values[self.offsets[index] : self.offsets[index + 1]]


class FeatureDataset(torch.utils.data.Dataset):
    """Rows of named columns; per-token columns are lists (or arrays) of each row's length.

    `extra` holds per-row arrays (e.g. teacher logits from the cache), `[rows, max_length, ...]`
    or a `RaggedArray`, cut to each row's length on access.
    """

    def __init__(
        self,
        columns: Mapping[str, Sequence[Any]],
        extra: Mapping[str, np.ndarray | RaggedArray] | None = None,
    ) -> None:
        sizes = {name: len(values) for name, values in columns.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"columns differ in length: {sizes}")
        self.columns = dict(columns)
        self.extra = dict(extra or {})
        self._rows = next(iter(sizes.values()))
        for name, array in self.extra.items():
            if len(array) != self._rows:
                raise ValueError(f"extra column {name!r} has {len(array)} rows, expected {self._rows}.")

    def __len__(self) -> int:
        return self._rows

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = {name: values[index] for name, values in self.columns.items()}
        length = len(row["input_ids"])
        for name, array in self.extra.items():
            row[name] = array[index][:length]
        return row


class PadCollator:
    """Pads every per-token field to the batch's longest row; scalars become 1-D tensors.

    `pad_values` gives the pad per field (input ids: the tokenizer's pad id; masks and
    segment ids: 0); float fields not listed pad with 0.0.
    """

    def __init__(self, pad_token_id: int, pad_values: Mapping[str, float] | None = None) -> None:
        self.pad_values = {"input_ids": pad_token_id, **(pad_values or {})}

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {}
        for name in rows[0]:
            values = [row[name] for row in rows]
            if np.isscalar(values[0]):
                batch[name] = torch.tensor(values)
                continue
            width = max(len(v) for v in values)
            arrays = [np.asarray(v) for v in values]
            shape = (len(rows), width, *arrays[0].shape[1:])  # per-token vectors keep their width
            padded = np.full(shape, self.pad_values.get(name, 0), dtype=arrays[0].dtype)
            for i, arr in enumerate(arrays):
                padded[i, : len(arr)] = arr
            batch[name] = torch.from_numpy(padded)
        return batch


def inference_batches(
    model: torch.nn.Module, columns: Mapping[str, Sequence[Any]], pad_token_id: int, batch_size: int
) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
    """(row indices, padded batch) for a forward pass over every row, shortest rows first.

    Rows of similar length share a batch, so little is spent on padding; each batch holds only
    what `model.forward` accepts, on the model's device.
    """
    from kdlib.trainer import forward_inputs

    device = next(model.parameters()).device
    lengths = [len(ids) for ids in columns["input_ids"]]
    order = np.argsort(lengths, kind="stable")
    collate = PadCollator(pad_token_id)
    for begin in range(0, len(order), batch_size):
        rows = order[begin : begin + batch_size]
        batch = collate([{k: v[i] for k, v in columns.items()} for i in rows])
        yield rows, {k: v.to(device) for k, v in forward_inputs(model, batch, labels=False).items()}
