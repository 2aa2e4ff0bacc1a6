import math

import pytest
import torch
import torch.nn.functional as F

from kdlib.losses import mix_losses, soft_target_kl


def test_zero_for_identical_distributions():
    logits = torch.randn(4, 7)
    assert soft_target_kl(logits, logits.clone(), temperature=3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_shift_invariance_zero():
    logits = torch.randn(3, 5)
    assert soft_target_kl(logits + 10.0, logits, 2.0).item() == pytest.approx(0.0, abs=1e-5)


def test_hand_computed_value():
    # teacher p = softmax([0, ln 3]) = [1/4, 3/4], student q = [1/2, 1/2], T = 1
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[0.0, math.log(3.0)]])
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert soft_target_kl(student, teacher, 1.0).item() == pytest.approx(expected, rel=1e-6)


def test_temperature_squared_scaling_of_value():
    # At T = 2 the tempered teacher is softmax([0, ln 3]/2) = softmax([0, ln sqrt 3]).
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[0.0, math.log(3.0)]])
    p1 = 1 / (1 + math.sqrt(3))
    p = [p1, 1 - p1]
    expected = 4.0 * sum(pi * math.log(pi / 0.5) for pi in p)
    assert soft_target_kl(student, teacher, 2.0).item() == pytest.approx(expected, rel=1e-6)


def test_matches_kldiv_batchmean_definition():
    s, t = torch.randn(5, 9), torch.randn(5, 9)
    T = 2.5
    reference = F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T**2
    assert soft_target_kl(s, t, T).item() == pytest.approx(reference.item(), rel=1e-5)


def test_gradient_scale_is_temperature_independent_at_high_t():
    # d/dz_s of T^2 KL -> (q - p) * T; for logits small relative to T it tends to (z_s - z_t)/C.
    torch.manual_seed(0)
    s = torch.randn(1, 6)
    t = torch.randn(1, 6)
    norms = []
    for T in (20.0, 40.0, 80.0):
        z = s.clone().requires_grad_(True)
        soft_target_kl(z, t, T).backward()
        norms.append(z.grad.norm().item())
    assert norms[0] == pytest.approx(norms[2], rel=0.02)
    # without the T^2 factor the gradient would shrink by 16x from T=20 to T=80
    z = s.clone().requires_grad_(True)
    (soft_target_kl(z, t, 80.0) / 80.0**2).backward()
    assert z.grad.norm().item() < norms[2] / 1000


def test_row_mask_excludes_rows_from_value_and_mean():
    s, t = torch.randn(3, 4), torch.randn(3, 4)
    mask = torch.tensor([True, False, True])
    garbage_t = t.clone()
    garbage_t[1] = 1e4  # a masked row may hold anything
    masked = soft_target_kl(s, garbage_t, 2.0, mask=mask)
    kept = soft_target_kl(s[mask], t[mask], 2.0)
    assert masked.item() == pytest.approx(kept.item(), rel=1e-6)
    per_row = soft_target_kl(s, garbage_t, 2.0, mask=mask, reduction="none")
    assert per_row[1].item() == 0.0


def test_class_mask_removes_positions_from_distribution():
    s = torch.tensor([[1.0, 2.0, 0.5, 9.0]])
    t = torch.tensor([[0.0, 1.0, 3.0, -9.0]])
    valid = torch.tensor([[True, True, True, False]])
    masked = soft_target_kl(s, t, 1.0, class_mask=valid)
    trimmed = soft_target_kl(s[:, :3], t[:, :3], 1.0)
    assert masked.item() == pytest.approx(trimmed.item(), rel=1e-6)
    assert torch.isfinite(masked)


def test_masked_gradient_is_zero_on_masked_positions():
    s = torch.randn(2, 5, requires_grad=True)
    t = torch.randn(2, 5)
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[:, 3:] = False
    soft_target_kl(s, t, 2.0, class_mask=valid).backward()
    assert torch.all(s.grad[:, 3:] == 0)
    assert torch.all(torch.isfinite(s.grad))


def test_reductions_agree():
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    per_row = soft_target_kl(s, t, 1.5, reduction="none")
    assert per_row.shape == (4,)
    assert soft_target_kl(s, t, 1.5, reduction="sum").item() == pytest.approx(per_row.sum().item(), rel=1e-6)
    assert soft_target_kl(s, t, 1.5).item() == pytest.approx(per_row.mean().item(), rel=1e-6)
    assert torch.all(per_row >= -1e-7)  # KL is non-negative


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_rejects_non_positive_temperature(bad):
    with pytest.raises(ValueError, match="temperature"):
        soft_target_kl(torch.zeros(1, 2), torch.zeros(1, 2), bad)


def test_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        soft_target_kl(torch.zeros(1, 2), torch.zeros(1, 3), 1.0)


def test_mix_weights_and_edges():
    soft, hard = torch.tensor(2.0), torch.tensor(4.0)
    assert mix_losses(soft, hard, 0.5, 0.5).item() == pytest.approx(3.0)
    assert mix_losses(soft, hard, 1.0, 0.0).item() == pytest.approx(2.0)
    assert mix_losses(soft, hard, 0.0, 1.0).item() == pytest.approx(4.0)
    # a zero weight drops its term entirely, so a NaN there does not propagate
    assert mix_losses(torch.tensor(float("nan")), hard, 0.0, 1.0).item() == pytest.approx(4.0)
    with pytest.raises(ValueError, match="alpha_ce"):
        mix_losses(soft, hard, 1.5, 0.5)
    with pytest.raises(ValueError, match="alpha_task"):
        mix_losses(soft, hard, 0.5, -0.1)
