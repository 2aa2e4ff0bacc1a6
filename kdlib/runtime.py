"""Keep freed memory in the process for reuse: on a CPU, training's large tensors otherwise cost
page faults on every step.

glibc gives every allocation above its mmap threshold (32 MB at most) its own mapping and hands
it back to the kernel when it is freed. A causal LM's `[tokens x vocab]` logits (100-200 MB for
SmolLM2 at 8 x 128 tokens), their gradients and the teacher's are therefore mapped, faulted in
page by page (each page zero-filled by the kernel) and unmapped again on every training step.
Measured on the benchmark's 2-core machine, a SmolLM2 distillation step spent about a third of
its time in the kernel doing that, and took 2.8 s instead of 2.0 s. PyTorch's CUDA allocator
caches freed blocks for the same reason; on a CPU `keep_freed_memory` has glibc serve every
allocation from its heap and keep what is freed there.

The cost: the process's resident memory stays near its high-water mark instead of falling
between steps (+7% peak on the benchmark's SmolLM2 steps; chapter 3's peak fell, 6.9 -> 6.4 GB).
glibc before 2.38 cannot serve a 64-byte-aligned request (PyTorch's) from a freed hole of exactly
the same size, so a repeated allocation may grow the heap once more before it settles. Nothing
changes off glibc (macOS, musl) or in a GPU's memory.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import os
import platform

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: keep up to 2 GB free at the heap's top
ENVIRONMENT = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(_TRIM_THRESHOLD)}
"""The same settings as glibc reads them when a process starts (notebook kernels, workers)."""


def keep_freed_memory(children: bool = True) -> bool:
    """Serve large allocations from glibc's heap and never trim it; False where libc isn't glibc.

    With `children`, processes started from this one afterwards (a papermill kernel, a spawned
    worker) get the same settings through their environment.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    applied = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    if applied and children:
        os.environ.update(ENVIRONMENT)
    return applied


def freeze_imported_objects(*modules: str) -> int:
    """Import `modules`, then move every object the cyclic garbage collector tracks into its
    permanent generation (`gc.freeze`), where no later collection walks it; returns how many
    objects are frozen now.

    transformers' `Trainer.train` starts with accelerate's `free_memory`, a full `gc.collect()`.
    In a process that has imported torch and transformers that walks about half a million objects
    the imports made, 0.2 s on a 2-core CPU, at every run: a chapter at the smoke profile trains a
    dozen runs of a few steps each. Call this once, after the imports and before the work, so a
    collection walks only what the work made. Frozen objects are still freed when their last
    reference goes; only a reference cycle among them would outlive its use, and objects made
    by imports live as long as the process.
    """
    for name in modules:
        importlib.import_module(name)
    gc.freeze()
    return gc.get_freeze_count()
