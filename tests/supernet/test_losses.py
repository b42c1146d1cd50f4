import torch

from lit_eff.supernet.losses import _f_divergence, kd_alpha, kd_kl


def test_alpha_divergence_limits_and_gradient():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 5, requires_grad=True), torch.randn(6, 5)
    s, t = student.log_softmax(-1), teacher.log_softmax(-1)
    forward_kl = (t.exp() * (t - s)).sum(-1)
    reverse_kl = (s.exp() * (s - t)).sum(-1)
    assert torch.allclose(_f_divergence(s, t, 1.0, 1e9)[0], forward_kl, atol=1e-5)
    assert torch.allclose(_f_divergence(s, t, 0.0, 1e9)[0], reverse_kl, atol=1e-5)
    # alpha = 1 everywhere: the surrogate's gradient is KL(teacher || student)'s
    g_alpha = torch.autograd.grad(kd_alpha(student, teacher, 1.0, 1.0, clip=1e9), student)[0]
    g_kl = torch.autograd.grad(kd_kl(student, teacher, 1.0), student)[0]
    assert torch.allclose(g_alpha, g_kl, atol=1e-6)
    # at the teacher both losses have zero gradient (a student equal to the teacher stays)
    at_teacher = teacher.clone().requires_grad_()
    assert kd_kl(at_teacher, teacher).abs() < 1e-6
    assert torch.autograd.grad(kd_alpha(at_teacher, teacher), at_teacher)[0].abs().max() < 1e-6
