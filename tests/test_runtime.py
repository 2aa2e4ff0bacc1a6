"""`keep_freed_memory`: a large tensor freed and allocated again costs no new page faults.
`freeze_imported_objects`: what exists when it runs is no longer walked by a collection."""

import os
import resource
import subprocess
import sys
import textwrap

import pytest
import torch

from kdlib.runtime import ENVIRONMENT, keep_freed_memory


def faults_to_fill(megabytes: int) -> int:
    """Minor page faults taken to allocate and write one tensor of `megabytes`, then free it."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(megabytes * 2**18)  # float32
    del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(os.uname().sysname != "Linux", reason="glibc's allocator")
def test_freed_large_tensors_are_reused_without_page_faults():
    assert keep_freed_memory()
    assert all(os.environ[k] == v for k, v in ENVIRONMENT.items())  # for kernels started later
    pages = 96 * 2**20 // resource.getpagesize()
    faults_to_fill(128)  # the heap grows to hold it
    again = faults_to_fill(96)
    assert again < pages // 20, again  # unmapped when freed, every page would fault in again


FROZEN = textwrap.dedent(
    """
    import gc, sys, weakref
    from kdlib.runtime import freeze_imported_objects

    class Node:
        pass

    cycle = Node()
    cycle.self = cycle  # only a collection could free it
    alone = Node()
    refs = weakref.ref(cycle), weakref.ref(alone)
    frozen = freeze_imported_objects("json")
    after = Node()
    tracked = gc.get_objects()
    walked = any(o is cycle for o in tracked), any(o is after for o in tracked)
    del cycle, alone, tracked
    gc.collect()
    print(frozen > 1000, "json" in sys.modules, *walked, refs[1]() is None, refs[0]() is not None)
    """
)


def test_frozen_objects_are_not_walked_but_still_freed_by_reference_count():
    # a process of its own: the freeze cannot be undone for what the test session froze
    out = subprocess.run([sys.executable, "-c", FROZEN], capture_output=True, text=True, check=True).stdout
    # imported; made before: not walked, made after: walked; a frozen object is freed when its
    # last reference goes, a frozen cycle is not (what the docstring warns of)
    assert out.split() == ["True", "True", "False", "True", "True", "True"]
