"""The KD loss against Hinton et al.'s formulas; the hint loss and its projection."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lit_eff.distill import Projection, feature_loss, kd_loss


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_loss_is_t_squared_kl_of_softened_distributions_and_its_gradient_is_t_times_p_minus_q(temperature):
    torch.manual_seed(0)
    student = torch.randn(6, 10, requires_grad=True)
    teacher = torch.randn(6, 10) * 3
    loss = kd_loss(student, teacher, temperature)
    q = torch.softmax(teacher / temperature, -1)  # soft targets
    p = torch.softmax(student / temperature, -1)
    by_hand = temperature ** 2 * (q * (q.log() - p.log())).sum(-1).mean()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    loss.backward()
    # Hinton et al. 2015, eq. 2 (per row, averaged over the 6 rows)
    assert torch.allclose(student.grad, temperature * (p - q).detach() / 6, atol=1e-6)


def test_high_temperature_gradient_matches_logits_to_logits():
    """Hinton et al.: as T grows, the gradient for zero-mean logits tends to (z - v) / N."""
    torch.manual_seed(0)
    z = torch.randn(1, 10)
    v = torch.randn(1, 10)
    z, v = (z - z.mean()).requires_grad_(), v - v.mean()
    kd_loss(z, v, 1000.0).backward()
    assert torch.allclose(z.grad, (z - v).detach() / 10, atol=1e-3)


def test_kd_loss_averages_over_positions_of_sequences():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    assert kd_loss(student, teacher, 2.0).item() == pytest.approx(
        kd_loss(student.reshape(10, 7), teacher.reshape(10, 7), 2.0).item(), rel=1e-6)
    assert kd_loss(student, student, 2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_projection_maps_token_channels_or_convolution_channels():
    torch.manual_seed(0)
    tokens = Projection(4, 6)
    x = torch.randn(2, 3, 4)
    assert torch.allclose(tokens(x), x @ tokens.weight.T)
    conv = Projection(4, 6, dim=1)
    maps = torch.randn(2, 4, 5, 5)
    assert torch.allclose(conv(maps), F.conv2d(maps, conv.weight[:, :, None, None]), atol=1e-6)
    assert feature_loss(maps, conv(maps).detach(), conv).item() == 0.0
    assert feature_loss(x, x + 1).item() == pytest.approx(1.0)
