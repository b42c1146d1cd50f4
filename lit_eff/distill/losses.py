"""The two distillation losses: soft targets (Hinton et al. 2015) and feature hints (FitNets,
Romero et al. 2015), plus the learned projection a hint needs when widths differ."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Projection", "feature_loss", "kd_loss"]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² · KL(softmax(teacher / T) ‖ softmax(student / T))``, averaged over every row (all
    dimensions but the last, so a language model's positions count like samples), in float32.

    The ``T²`` keeps the gradient's size independent of ``T``: ``d/dz = T · (q − p)``.

    >>> s, t = torch.zeros(2, 3), torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    >>> round(kd_loss(s, s, 2.0).item(), 6), kd_loss(s, t, 1.0).item() > 0
    (0.0, True)
    """
    classes = student_logits.shape[-1]
    student = F.log_softmax(student_logits.float().reshape(-1, classes) / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float().reshape(-1, classes) / temperature, dim=-1)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * (temperature * temperature)


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, projection: nn.Module | None = None) -> torch.Tensor:
    """Mean squared error between a (projected) student feature and the teacher's, in float32."""
    if projection is not None:
        student = projection(student)
    return F.mse_loss(student.float(), teacher.float())


class Projection(nn.Module):
    """A learned linear map of one dimension of a feature (``dim=-1``: tokens' channels;
    ``dim=1``: convolution channels), from the student's width to the teacher's; no bias."""

    def __init__(self, in_width: int, out_width: int, dim: int = -1) -> None:
        super().__init__()
        self.dim = dim
        self.weight = nn.Parameter(torch.empty(out_width, in_width))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's initialisation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dim in (-1, x.dim() - 1):
            return F.linear(x, self.weight)
        return F.linear(x.movedim(self.dim, -1), self.weight).movedim(-1, self.dim)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]} -> {self.weight.shape[0]}, dim={self.dim}"
