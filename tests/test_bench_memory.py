"""bench.measure.tensor_peak_mb: the most tensor memory a call holds at once, counted exactly."""

import pytest
import torch

from bench.measure import tensor_peak_mb

MB = 2**20


def test_tensor_peak_is_what_the_call_holds_at_once_beyond_what_was_alive():
    held = torch.empty(8 * MB, dtype=torch.uint8)  # alive before the call: not counted

    def call():
        a = torch.empty(MB, dtype=torch.uint8)
        b = torch.empty(3 * MB, dtype=torch.uint8)  # 4 MB at once
        del a, b
        c = torch.empty(2 * MB, dtype=torch.uint8)  # 2 MB after both were freed
        del c
        held.add_(1)  # in place: no new memory

    assert tensor_peak_mb(call) == pytest.approx(4.0, abs=0.01)


def test_tensor_peak_counts_a_backward_pass_and_what_the_call_keeps():
    weight = torch.ones(256, 256, requires_grad=True)
    kept = []

    def call():
        loss = (torch.ones(1024, 256) @ weight).sum()  # the input (1 MB) and the product (1 MB)
        loss.backward()  # adds the weight's gradient (0.25 MB), kept beyond the call
        kept.append(weight.grad)

    assert tensor_peak_mb(call) == pytest.approx(2.25, abs=0.05)
