"""The Distiller's hooks: the student's gradient is that of the weighted sum computed by hand."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lit_eff.distill import Distiller, Projection, kd_loss
from tests.distill.common import gpt


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def outputs_of(module: torch.nn.Module, names: list[str]):
    """Forward hooks that keep the outputs of the named layers."""
    kept, layers = {}, dict(module.named_modules())
    handles = [layers[n].register_forward_hook(lambda m, a, out, n=n: kept.__setitem__(n, out)) for n in names]
    return kept, handles


def setup(alpha=0.3, temperature=2.0, feature_weight=0.5, checkpointing=False):
    torch.manual_seed(0)
    student = gpt().model
    student.set_grad_checkpointing(checkpointing)
    teacher = gpt(n_layer=3, n_embd=48).model.eval().requires_grad_(False)
    projection = Projection(32, 48)
    idx = torch.randint(0, 256, (2, 16))
    targets = torch.randint(0, 256, (2, 16))
    return student, teacher, projection, idx, targets


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_student_gradient_is_that_of_the_weighted_sum(scale):
    alpha, temperature, weight = 0.3, 2.0, 0.5
    student, teacher, projection, idx, targets = setup()
    reference, reference_projection = copy.deepcopy(student), copy.deepcopy(projection)
    # by hand: (1 - alpha) task + alpha KD + weight * MSE(projected student block 1, teacher block 2), times scale
    kept, handles = outputs_of(reference, ["blocks.1"])
    teacher_kept, teacher_handles = outputs_of(teacher, ["blocks.2"])
    logits = reference(idx)
    with torch.no_grad():
        teacher_logits = teacher(idx)
    task = F.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1))
    hint = F.mse_loss(reference_projection(kept["blocks.1"]), teacher_kept["blocks.2"])
    total = (1 - alpha) * task + alpha * kd_loss(logits, teacher_logits, temperature) + weight * hint
    (scale * total).backward()
    for handle in handles + teacher_handles:
        handle.remove()
    # the hooks: the training loop sees only the task loss (scaled like a loop would scale it)
    distiller = Distiller(student, teacher, temperature, alpha, [("blocks.1", "blocks.2")], weight, [projection])
    distiller.set_grad_scale(scale)
    out = student(idx)
    assert torch.equal(out, logits.detach())  # the value is unchanged
    (scale * F.cross_entropy(out.reshape(-1, 256), targets.reshape(-1))).backward()
    expected, got = grads(reference), grads(student)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.allclose(got[name], expected[name], rtol=1e-5, atol=1e-7), name
    assert torch.allclose(projection.weight.grad, reference_projection.weight.grad, rtol=1e-5, atol=1e-8)
    assert distiller.last[1].item() == pytest.approx(hint.item(), rel=1e-6)
    assert not any(p.grad is not None for p in teacher.parameters())


def test_activation_checkpointing_gives_the_same_gradients():
    results = []
    for checkpointing in (False, True):
        student, teacher, projection, idx, targets = setup(checkpointing=checkpointing)
        pairs = [("blocks.0", "blocks.1"), ("blocks.1", "blocks.2")]
        distiller = Distiller(student, teacher, 2.0, 0.3, pairs, 0.5, [projection, copy.deepcopy(projection)])
        F.cross_entropy(student(idx).reshape(-1, 256), targets.reshape(-1)).backward()
        results.append(grads(student))
        assert distiller._student_features is None  # the recompute in backward kept nothing
    for name in results[0]:
        assert torch.allclose(results[1][name], results[0][name], rtol=1e-6, atol=1e-8), name


def test_evaluation_and_no_grad_forwards_are_left_alone():
    student, teacher, _, idx, _ = setup()
    calls = []
    teacher.register_forward_hook(lambda *args: calls.append(1))
    distiller = Distiller(student, teacher, 2.0, 0.5)
    with torch.no_grad():
        student(idx)
    student.eval()
    out = student(idx)
    assert calls == [] and distiller.last is None and out.grad_fn is not None
    student.train()
    student(idx)
    assert calls == [1] and distiller.last is not None
    distiller.remove()
    student(idx)
    assert calls == [1]


def test_mismatched_outputs_and_features_fail_on_the_first_forward():
    student, _, _, idx, _ = setup()
    idx = idx % 128
    teacher = gpt(vocab_size=128).model.eval()
    distiller = Distiller(student, teacher, 2.0, 0.5)
    with pytest.raises(ValueError, match=r"The teacher's output \(2, 16, 128\) does not match the student's "
                                         r"\(2, 16, 256\): `teacher` must be a network with the student's outputs"):
        student(idx)
    distiller.remove()
    Distiller(student, gpt(n_embd=48).model.eval(), 2.0, 0.5, [("blocks.1", "blocks.1")])
    with pytest.raises(ValueError, match=r"`features` 'blocks.1' -> 'blocks.1': the student's feature \(2, 16, 32\) "
                                         r"cannot be compared with the teacher's \(2, 16, 48\)"):
        student(idx)
