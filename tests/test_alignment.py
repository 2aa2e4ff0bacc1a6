"""Teacher-layer selection and alignment against worked examples (and CoFi's defects fixed)."""

import pytest
import torch

from kdlib.alignment import (
    align,
    aligned_loss,
    existing_layers,
    layer_loss_matrix,
    select_teacher_layers,
    uniform_layers,
)


def test_uniform_spacing_reproduces_tinybert_choice():
    assert uniform_layers(12, 4) == [2, 5, 8, 11]
    assert uniform_layers(24, 4) == [5, 11, 17, 23]
    assert uniform_layers(6, 3) == [1, 3, 5]
    assert uniform_layers(12, 12) == list(range(12))


def test_fixed_layers_are_checked_against_the_depth():
    assert select_teacher_layers("fixed", 12, 4) == [2, 5, 8, 11]
    with pytest.raises(ValueError, match=r"\[12\] do not exist.*0..11"):
        select_teacher_layers("fixed", 12, 4, fixed=[2, 5, 8, 12])
    with pytest.raises(ValueError, match="distinct and increasing"):
        select_teacher_layers("fixed", 12, 2, fixed=[5, 2])


def test_random_selection_is_sorted_distinct_and_seeded():
    draws = []
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        layers = select_teacher_layers("random", 12, 4, generator=g)
        assert layers == sorted(set(layers)) and len(layers) == 4  # CoFi's v5 could unsort
        assert all(0 <= x < 12 for x in layers)
        draws.append(tuple(layers))
    assert min(d[0] for d in draws) < 2  # no hidden reset of the first layer to >= 2
    again = [
        tuple(select_teacher_layers("random", 12, 4, generator=torch.Generator().manual_seed(s)))
        for s in range(200)
    ]
    assert again == draws


def test_window_selection_takes_one_layer_per_window():
    seen = [set() for _ in range(4)]
    for seed in range(300):
        layers = select_teacher_layers("window", 12, 4, generator=torch.Generator().manual_seed(seed))
        for i, layer in enumerate(layers):
            assert 3 * i <= layer < 3 * (i + 1)
            seen[i].add(layer)
    assert all(len(s) == 3 for s in seen)  # every layer of every window gets drawn
    for seed in range(50):  # uneven windows still partition the depth
        layers = select_teacher_layers("window", 10, 4, generator=torch.Generator().manual_seed(seed))
        assert layers == sorted(set(layers)) and layers[-1] <= 9


@pytest.mark.parametrize("k", [0, 13])
def test_impossible_counts_are_refused(k):
    with pytest.raises(ValueError, match=f"cannot choose {k} of 12"):
        select_teacher_layers("random", 12, k)


def test_existing_layers_count_the_ffn_too():
    heads = torch.tensor([[1, 1], [0, 0], [0, 0], [1, 0]])
    ffn = torch.tensor([1, 1, 0, 0])
    assert existing_layers(heads).tolist() == [True, False, False, True]
    assert existing_layers(heads, ffn).tolist() == [True, True, False, True]  # layer 1 keeps its FFN
    assert existing_layers(n_layers=3).tolist() == [True, True, True]


def test_layer_loss_matrix_worked_example_and_padding():
    t = [torch.zeros(1, 2, 2), torch.ones(1, 2, 2)]
    s = [torch.zeros(1, 2, 2), torch.full((1, 2, 2), 2.0), torch.ones(1, 2, 2)]
    m = layer_loss_matrix(t, s)
    assert m.tolist() == [[0.0, 4.0, 1.0], [1.0, 1.0, 0.0]]
    s_pad = [x.clone() for x in s]
    s_pad[0][0, 1] = 100.0  # garbage at a padding position
    masked = layer_loss_matrix(t, s_pad, attention_mask=torch.tensor([[1, 0]]))
    assert masked.tolist() == m.tolist()


def _direct_matrix(teacher, student, mask):
    """The definition as plain tensor algebra: every pair's difference, squared, averaged."""
    diff = torch.stack(teacher)[:, None] - torch.stack(student)[None]  # [k, m, batch, seq, width]
    sq = diff.pow(2).mean(dim=-1)
    w = mask.to(sq.dtype)
    return (sq * w).sum(dim=(-2, -1)) / w.sum()


def _states(k, m, shape, dtype, scale=1.0, requires_grad=False):
    g = torch.Generator().manual_seed(k * 10 + m)
    make = lambda: (scale * torch.randn(*shape, generator=g, dtype=dtype)).requires_grad_(requires_grad)  # noqa: E731
    return [make() for _ in range(k)], [make() for _ in range(m)]


def test_layer_loss_matrix_value_and_gradient_equal_the_definition():
    teacher, student = _states(3, 4, (2, 5, 6), torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    upstream = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ours = layer_loss_matrix(teacher, student, mask)
    direct = _direct_matrix(teacher, student, mask)
    torch.testing.assert_close(ours, direct, rtol=1e-12, atol=0)
    grads = torch.autograd.grad((ours * upstream).sum(), teacher + student)
    expected = torch.autograd.grad((direct * upstream).sum(), teacher + student)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    assert grads[-1][0, 3:].abs().max() == 0  # padding positions get no gradient
    unmasked = layer_loss_matrix(teacher, student)
    everywhere = _direct_matrix(teacher, student, torch.ones(2, 5))
    torch.testing.assert_close(unmasked, everywhere, rtol=1e-12, atol=0)


def test_layer_loss_matrix_in_float32_with_outlier_dimensions():
    """Hidden states of MPNet and MiniLM have a few dimensions far larger than the rest."""
    teacher, student = _states(4, 6, (4, 16, 64), torch.float64)
    for states in (teacher, student):
        for h in states:
            h[..., :2] *= 60.0
    exact = _direct_matrix(teacher, student, torch.ones(4, 16))
    single = layer_loss_matrix([t.float() for t in teacher], [s.float() for s in student])
    assert single.dtype == torch.float32
    torch.testing.assert_close(single.double(), exact, rtol=1e-5, atol=0)


# Loss matrix used by the worked alignment examples: 3 teacher layers x 4 student layers.
LOSS = torch.tensor(
    [
        [0.1, 0.5, 0.9, 0.2],
        [0.8, 0.3, 0.2, 0.1],
        [0.9, 0.8, 0.4, 0.05],
    ]
)


def test_min_alignment_is_per_row_argmin_and_skips_removed_layers():
    assert align(LOSS, "min").tolist() == [0, 3, 3]
    exists = torch.tensor([True, True, True, False])
    assert align(LOSS, "min", exists).tolist() == [0, 2, 2]


def test_ordered_alignment_keeps_order_searching_from_the_top():
    # top teacher layer takes 3 (0.05); the middle one the best below 3 that leaves room: 2;
    # the bottom one the best below 2: 0
    assert align(LOSS, "ordered").tolist() == [0, 2, 3]
    exists = torch.tensor([True, False, True, True])
    assert align(LOSS, "ordered", exists).tolist() == [0, 2, 3]
    exists = torch.tensor([True, True, False, True])
    assert align(LOSS, "ordered", exists).tolist() == [0, 1, 3]


def test_ordered_alignment_never_runs_out_of_layers():
    # greedy from the top would give the top teacher layer student layer 0 and leave nothing
    loss = torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5], [0.0, 1.0, 1.0]])
    assert align(loss, "ordered").tolist() == [0, 1, 2]


def ordered_by_definition(loss: torch.Tensor, exists: list[bool]) -> list[int]:
    """The ordered matching as its docstring states it, one Python loop over candidates."""
    k, m = loss.shape
    available = [j for j in range(m) if exists[j]]
    chosen, below = [], m
    for row in range(k - 1, -1, -1):
        candidates = [j for j in available if j < below and sum(a < j for a in available) >= row]
        below = min(candidates, key=lambda c: float(loss[row, c]))
        chosen.append(below)
    return chosen[::-1]


def test_ordered_alignment_matches_its_definition_on_random_matrices_with_ties_and_gaps():
    generator = torch.Generator().manual_seed(0)
    for trial in range(300):
        k, m = 1 + trial % 4, 4 + trial % 9
        # values from a small set, so that ties are common: the lowest index must win them
        loss = torch.randint(0, 4, (k, m), generator=generator).double()
        exists = torch.rand(m, generator=generator) > 0.3
        if int(exists.sum()) < k:
            continue
        got = align(loss, "ordered", exists).tolist()
        assert got == ordered_by_definition(loss, exists.tolist()), (loss, exists)


def test_ordered_alignment_keeps_to_allowed_layers_when_losses_overflow():
    loss = torch.tensor([[float("inf"), float("inf"), float("nan")], [0.0, float("inf"), 1.0]])
    assert align(loss, "ordered").tolist() == [0, 2]
    assert align(loss, "ordered", torch.tensor([False, True, True])).tolist() == [1, 2]


def test_one_to_one_and_reversed_controls():
    exists = torch.tensor([True, False, True, True])
    assert align(LOSS, "one-to-one").tolist() == [0, 1, 2]
    assert align(LOSS, "one-to-one", exists).tolist() == [0, 2, 3]
    assert align(LOSS, "reversed").tolist() == [3, 2, 1]


def test_matching_that_needs_enough_student_layers_says_so():
    with pytest.raises(ValueError, match="4 teacher layers, 3 existing student layers"):
        align(torch.zeros(4, 3), "ordered")
    assert align(torch.zeros(4, 3), "min").shape == (4,)


def test_aligned_loss_is_a_proper_sum():
    alignment = align(LOSS, "ordered")
    assert aligned_loss(LOSS, alignment).item() == pytest.approx(0.1 + 0.2 + 0.05)
    assert aligned_loss(LOSS, torch.tensor([0, 1, 2])).item() == pytest.approx(0.1 + 0.3 + 0.4)
