"""Teacher outputs computed once per fingerprint and reused across epochs, runs and seeds.

A teacher's forward pass is the dominant cost of distillation on a CPU; the same teacher on
the same tokenised inputs always gives the same logits, so they are stored under a key that
hashes everything they depend on (the teacher's weights, the exact input ids, the settings).
Any change gives a new key, so a stale entry is never read. Entries are safetensors files
written to a temporary name and renamed into place, so a reader sees a whole entry or none;
an entry that fails to load is deleted and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from kdlib.registry import cache_dir


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the model's class, config and every parameter and buffer, in order."""
    digest = hashlib.sha256(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None:
        digest.update(config.to_json_string(use_diff=False).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def sequences_fingerprint(sequences: Iterable[Iterable[int]]) -> str:
    """sha256 of a list of token-id sequences (lengths included, so no two lists collide)."""
    digest = hashlib.sha256()
    for seq in sequences:
        arr = np.asarray(list(seq), dtype=np.int64)
        digest.update(np.int64(arr.size).tobytes())
        digest.update(arr.tobytes())
    return digest.hexdigest()


def cache_key(**parts: Any) -> str:
    """A key from named parts (fingerprints and settings), order-independent."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


class TeacherOutputCache:
    """A folder of named arrays per key: `get_or_compute(key, compute)`."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root) if root is not None else cache_dir() / "teacher-outputs"
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def load(self, key: str) -> dict[str, np.ndarray] | None:
        """The arrays stored under `key`, or None if absent, unreadable or mislabelled."""
        path = self.path(key)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="numpy") as handle:
                if (handle.metadata() or {}).get("key") != key:
                    raise ValueError("entry was written under another key")
                return {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception:  # noqa: BLE001 - any unreadable entry is recomputed, never trusted
            path.unlink(missing_ok=True)
            return None

    def store(self, key: str, arrays: Mapping[str, np.ndarray]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{key}-", suffix=".tmp", dir=self.root)
        os.close(handle)
        try:
            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, tmp, metadata={"key": key})
            os.replace(tmp, self.path(key))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def get_or_compute(
        self, key: str, compute: Callable[[], Mapping[str, np.ndarray]]
    ) -> dict[str, np.ndarray]:
        """The arrays under `key`, computed and stored first if missing or unreadable.

        Under torch.distributed (torchrun, accelerate launch) the main process looks first and
        computes a missing entry while the others wait at a barrier; they then read what it
        wrote, so the teacher runs once per entry, not once per process.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self._get_or_compute(key, compute)
        main = dist.get_rank() == 0
        if not main:
            dist.barrier()  # wait for the main process to write the entry
        try:
            return self._get_or_compute(key, compute)
        finally:
            if main:
                dist.barrier()

    def _get_or_compute(
        self, key: str, compute: Callable[[], Mapping[str, np.ndarray]]
    ) -> dict[str, np.ndarray]:
        found = self.load(key)
        if found is not None:
            self.hits += 1
            return found
        self.misses += 1
        arrays = dict(compute())
        self.store(key, arrays)
        return arrays
