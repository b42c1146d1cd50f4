"""Distillation wired into a student network's forward, for any training loop.

:class:`Distiller` hooks the student network: after each training forward (module in
training mode, gradients on) it runs the frozen teacher on the same inputs under
``torch.no_grad()``, computes the distillation loss, and returns the student's output through
:class:`_AddDistillGrad`, an identity whose backward scales the gradient arriving at the output
by ``1 − alpha`` and sends ``grad_scale`` into the distillation loss's graph. The student's
gradient is then that of ``(1 − alpha) · task + alpha · KD + feature_weight · Σ hints``
while the task loss and the training loop stay untouched; ``grad_scale`` holds what the loop
multiplies the loss by before backward (``1 / accumulation`` times an AMP grad scaler's scale).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lit_eff.distill.losses import feature_loss, kd_loss
from lit_eff.models.naming import named_modules

__all__ = ["Distiller"]


class _AddDistillGrad(torch.autograd.Function):
    """Identity on ``output``; backward: ``task_scale`` times the output's gradient, and
    ``grad_scale`` as the gradient of ``loss`` (so ``d(grad_scale · loss)`` joins the backward)."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, loss: torch.Tensor, grad_scale: torch.Tensor,
                task_scale: float) -> torch.Tensor:
        ctx.task_scale = task_scale
        ctx.save_for_backward(grad_scale)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (grad_scale,) = ctx.saved_tensors
        return grad * ctx.task_scale, grad_scale, None, None


def _shape(value: Any) -> Any:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


class Distiller:
    """The hooks of one student/teacher pair; :meth:`remove` takes them off.

    Args:
        student, teacher: the networks (inputs -> logits); the teacher is used as given (frozen,
            in eval mode: see :func:`lit_eff.distill.build_teacher`).
        pairs: ``(student layer name, teacher layer name)`` pairs for feature hints.
        projections: one module or ``None`` per pair, applied to the student's feature.

    Attributes:
        grad_scale: a 0-dim tensor, the gradient of the distillation loss per forward (set it
            in place with :meth:`set_grad_scale`).
        last: the detached KD loss and hint losses of the last training forward.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, temperature: float, alpha: float,
                 pairs: Sequence[tuple[str, str]] = (), feature_weight: float = 1.0,
                 projections: Sequence[nn.Module | None] | None = None) -> None:
        self.student, self.teacher = student, teacher
        self.temperature, self.alpha, self.feature_weight = float(temperature), float(alpha), float(feature_weight)
        self.pairs = list(pairs)
        self.projections = list(projections) if projections is not None else [None] * len(self.pairs)
        self.grad_scale = torch.ones((), dtype=torch.float32)
        self._scale_value = 1.0
        self.last: tuple[torch.Tensor, ...] | None = None
        self._student_features: dict[str, torch.Tensor] | None = None
        self._teacher_features: dict[str, torch.Tensor] | None = None
        student_layers, teacher_layers = dict(named_modules(student)), dict(named_modules(teacher))
        self._handles = [student.register_forward_pre_hook(self._begin),
                         student.register_forward_hook(self._finish, with_kwargs=True)]
        for name in dict.fromkeys(s for s, _ in self.pairs):
            self._handles.append(student_layers[name].register_forward_hook(self._keeper("_student_features", name)))
        for name in dict.fromkeys(t for _, t in self.pairs):
            self._handles.append(teacher_layers[name].register_forward_hook(self._keeper("_teacher_features", name)))

    # -----------------------------------------------------------------------------------------
    def set_grad_scale(self, value: float) -> None:
        """Set :attr:`grad_scale` in place (a compiled step keeps reading the same tensor)."""
        if value != self._scale_value:
            self.grad_scale.fill_(value)
            self._scale_value = value

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> Distiller:
        """Move the teacher (to the student's device and parameter dtype) and :attr:`grad_scale`."""
        self.teacher.to(device=device, dtype=dtype)
        self.grad_scale = self.grad_scale.to(device)
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # hooks ------------------------------------------------------------------------------------
    def _keeper(self, store: str, name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            features = getattr(self, store)
            if features is not None:  # None: not a training forward, or a recompute in backward
                features[name] = output

        return hook

    def _begin(self, module: nn.Module, args: tuple) -> None:
        self._student_features = {} if module.training and torch.is_grad_enabled() else None

    def _finish(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        student_features, self._student_features = self._student_features, None
        if student_features is None:
            return None
        self._teacher_features = {}
        with torch.no_grad():
            teacher_output = self.teacher(*args, **kwargs)
        teacher_features, self._teacher_features = self._teacher_features, None
        if not isinstance(output, torch.Tensor) or not isinstance(teacher_output, torch.Tensor) \
                or output.shape != teacher_output.shape:
            raise ValueError(f"The teacher's output {_shape(teacher_output)} does not match the student's "
                             f"{_shape(output)}: `teacher` must be a network with the student's outputs "
                             "(the same classes or vocabulary)")
        kd = kd_loss(output, teacher_output, self.temperature)
        total, losses = kd * self.alpha, [kd]
        for (student_name, teacher_name), projection in zip(self.pairs, self.projections):
            student_feature = student_features.get(student_name)
            teacher_feature = teacher_features.get(teacher_name)
            if not isinstance(student_feature, torch.Tensor) or not isinstance(teacher_feature, torch.Tensor):
                raise ValueError(f"`features` {student_name!r} -> {teacher_name!r}: the layers must run in forward "
                                 f"and return a tensor, got {_shape(student_feature)} and {_shape(teacher_feature)}")
            projected = student_feature if projection is None else projection(student_feature)
            if projected.shape != teacher_feature.shape:
                raise ValueError(f"`features` {student_name!r} -> {teacher_name!r}: the student's feature "
                                 f"{_shape(projected)} cannot be compared with the teacher's {_shape(teacher_feature)}")
            hint = feature_loss(projected, teacher_feature)
            total = total + self.feature_weight * hint
            losses.append(hint)
        self.last = tuple(loss.detach() for loss in losses)
        return _AddDistillGrad.apply(output, total, self.grad_scale, 1.0 - self.alpha)
