"""`keep_freed_memory`: a large tensor freed and allocated again costs no new page faults."""

import os
import resource

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
