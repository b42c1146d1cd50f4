"""In-place distillation losses: a student's logits against the largest subnet's detached logits.

Logits may be ``[N, C]`` or ``[B, T, C]`` (language models); the class dimension is last.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))`` averaged over samples (tokens)."""
    c = student.shape[-1]
    s = F.log_softmax(student.float().reshape(-1, c) / temperature, dim=-1)
    t = F.log_softmax(teacher.detach().float().reshape(-1, c) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def _f_divergence(s_logp: torch.Tensor, t_logp: torch.Tensor, alpha: float, clip: float):
    """Per-sample alpha-divergence D_alpha(p_teacher || q_student) and a surrogate whose gradient
    w.r.t. the student logits is the divergence's gradient (importance weights clipped at ``clip``)."""
    q = s_logp.exp().detach()
    ratio = (t_logp - s_logp.detach()).exp()  # p / q
    if abs(alpha) < 1e-3:  # reverse KL limit
        ratio = ratio.clamp(0, clip)
        f, rho = -ratio.log(), ratio.log() - 1.0
        base = 0.0
    elif abs(alpha - 1.0) < 1e-3:  # forward KL limit
        f, rho, base = ratio * ratio.log(), ratio, 0.0
    else:
        w = ratio.pow(alpha).clamp(0, clip)
        base = 1.0 / (alpha * (alpha - 1.0))
        f, rho = w * base, w / alpha + base
    value = (q * (f - base)).sum(-1)
    surrogate = -(q * rho * s_logp).sum(-1)
    return value, surrogate


def kd_alpha(student: torch.Tensor, teacher: torch.Tensor, alpha_min: float = -1.0, alpha_max: float = 1.0,
             clip: float = 5.0) -> torch.Tensor:
    """AlphaNet's adaptive alpha-divergence: per sample, the larger of D_{alpha_min} and
    D_{alpha_max}; returns a surrogate scalar with that divergence's gradient."""
    c = student.shape[-1]
    s = F.log_softmax(student.float().reshape(-1, c), dim=-1)
    t = F.log_softmax(teacher.detach().float().reshape(-1, c), dim=-1)
    v_lo, g_lo = _f_divergence(s, t, alpha_min, clip)
    v_hi, g_hi = _f_divergence(s, t, alpha_max, clip)
    return torch.where(v_lo >= v_hi, g_lo, g_hi).mean()
