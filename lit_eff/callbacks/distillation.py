"""Knowledge distillation from a frozen teacher checkpoint into the trained model."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from lit_eff import validation
from lit_eff.callbacks.technique import Technique, log_step
from lit_eff.distill import PROJECTIONS, Distiller, Projection, build_teacher, network_of, output_width, pair_layers
from lit_eff.seeding import derive_seed, run_seed


class KnowledgeDistillation(Technique):
    """Distils a frozen teacher into the trained model (the student): soft targets (Hinton et al.
    2015) and, optionally, feature hints on named layers (FitNets, Romero et al. 2015).

    The student's gradient is that of ``(1 − alpha) · task + alpha · T² · KL(softmax(teacher/T) ‖
    softmax(student/T)) + feature_weight · Σ MSE(projection(student layer), teacher layer)``: the
    teacher runs inside the student network's training forward, on the same inputs, under
    ``no_grad``, so its forward FLOPs count as training FLOPs in ``FlopsMonitor``. It is rebuilt
    from ``teacher`` at ``setup``, frozen, in eval mode, on the student's device and parameter
    dtype, and never part of the student's state dict, optimizer or checkpoint. A projection (no
    bias) is learned where a hint's widths differ; it lives on the student network as
    ``kd_projections`` while training (so the optimizer trains it and checkpoints resume it) and
    is removed at ``teardown``. Logs ``distill/kd_loss`` and ``distill/feature_loss/<layer>``.
    Details: docs/techniques/distillation.md.

    Args:
        teacher: checkpoint file: a kit ``.ckpt`` or a state dict (``.pt``, ``.pth``, ``.safetensors``).
        teacher_model: ``None`` (rebuild the checkpoint's LightningModule from its hyperparameters),
            ``"student"`` (the trained module's architecture) or a timm model name.
        teacher_kwargs: overrides of those hyperparameters, or the timm model's arguments.
        temperature: the softmax temperature ``T`` > 0.
        alpha: weight of the KD term, in [0, 1]; the task loss gets ``1 − alpha``.
        features: student layer name (pattern) -> teacher layer name (pattern), relative to the
            networks (``blocks.3``, not ``model.blocks.3``); patterns matching several layers pair in order.
        feature_weight: weight of each hint's MSE.

    Example (a 2:4 student distilled from its dense teacher)::

        trainer:
          callbacks+:
            - class_path: lit_eff.callbacks.NMSparsity
              init_args: {n: 2, m: 4}
            - class_path: lit_eff.callbacks.KnowledgeDistillation
              init_args: {teacher: dense/checkpoints/last.ckpt, temperature: 4.0, alpha: 0.5}
    """

    def __init__(
        self,
        teacher: str,
        teacher_model: str | None = None,
        teacher_kwargs: dict[str, Any] | None = None,
        temperature: float = 4.0,
        alpha: float = 0.5,
        features: dict[str, str] | None = None,
        feature_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if not isinstance(teacher, str) or not teacher:
            raise ValueError(f"Expected `teacher` to be the path of a checkpoint file, got teacher={teacher!r}")
        if teacher_model is not None and (not isinstance(teacher_model, str) or not teacher_model):
            raise ValueError(f"Expected `teacher_model` to be None, 'student' or a timm model name, got "
                             f"teacher_model={teacher_model!r}")
        if teacher_kwargs is not None and not isinstance(teacher_kwargs, dict):
            raise ValueError(f"Expected `teacher_kwargs` to be a mapping of arguments, got teacher_kwargs={teacher_kwargs!r}")
        validation.check_number("temperature", temperature, 0.0, None, low_open=True)
        validation.check_fraction("alpha", alpha)
        if features is not None and (not isinstance(features, dict) or not all(
                isinstance(k, str) and k and isinstance(v, str) and v for k, v in features.items())):
            raise ValueError(f"Expected `features` to map student layer names to teacher layer names (strings), "
                             f"got features={features!r}")
        validation.check_number("feature_weight", feature_weight, 0.0, None)
        if alpha == 0 and not (features and feature_weight > 0):
            raise ValueError("Expected `alpha` > 0 or `features` with `feature_weight` > 0, got alpha=0 and no "
                             "feature hints: there would be nothing to distil")
        self.teacher = teacher
        self.teacher_model = teacher_model
        self.teacher_kwargs = dict(teacher_kwargs) if teacher_kwargs is not None else None
        self.temperature = temperature
        self.alpha = alpha
        self.features = dict(features) if features is not None else None
        self.feature_weight = feature_weight
        self.distiller: Distiller | None = None

    # -----------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self.distiller is not None:
            return
        student = network_of(pl_module)
        teacher = build_teacher(self.teacher, self.teacher_model, self.teacher_kwargs, pl_module)
        widths = output_width(student), output_width(teacher)
        if None not in widths and widths[0][0] != widths[1][0]:
            raise ValueError(f"The teacher's output width {widths[1][0]} differs from the student's {widths[0][0]} "
                             f"({type(teacher).__name__} from teacher={self.teacher!r}): the teacher must predict the "
                             "student's classes or vocabulary")
        pairs = pair_layers(student, teacher, self.features or {})
        projections = self._projections(student, pairs)
        self.distiller = Distiller(student, teacher, self.temperature, self.alpha, [(s, t) for s, t, _, _ in pairs],
                                   self.feature_weight, projections)

    def _projections(self, student: torch.nn.Module, pairs: list) -> list[Projection | None]:
        """A learned projection for each pair whose widths differ, registered on the student."""
        projections: list[Projection | None] = []
        for index, (student_name, teacher_name, student_layer, teacher_layer) in enumerate(pairs):
            widths = output_width(student_layer), output_width(teacher_layer)
            if None in widths or widths[0][0] == widths[1][0]:
                projections.append(None)
                continue
            reference = next(student_layer.parameters(), None)
            with torch.random.fork_rng(devices=[]):  # seeded by run and layer: the same on every rank
                torch.manual_seed(derive_seed(run_seed(), "kd-projection", index, student_name, teacher_name))
                projection = Projection(widths[0][0], widths[1][0], dim=widths[0][1])
            if reference is not None:
                projection.to(device=reference.device, dtype=reference.dtype)
            projections.append(projection)
        if any(p is not None for p in projections):
            student.add_module(PROJECTIONS, torch.nn.ModuleDict(
                {str(i): p for i, p in enumerate(projections) if p is not None}))
        return projections

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.distiller is None:
            return
        reference = next((p for p in pl_module.parameters() if p.is_floating_point()), None)
        self.distiller.to(trainer.strategy.root_device, reference.dtype if reference is not None else None)
        trained = {id(p) for optimizer in trainer.optimizers for group in optimizer.param_groups
                   for p in group["params"]}
        projections = getattr(network_of(pl_module), PROJECTIONS, None)
        if projections is not None and any(id(p) not in trained for p in projections.parameters()):
            raise ValueError(f"{self.describe(trainer)}: the optimizer of {type(pl_module).__name__} does not train the "
                             f"feature projections (`{PROJECTIONS}` on the student network, added because the "
                             "widths of a `features` pair differ): build the optimizer from the network's "
                             "parameters after setup, or pair layers of equal width")

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.distiller is None:
            return
        # what the loop multiplies the loss by before backward: 1/accumulation, and an AMP scaler's scale
        scale = 1.0 / trainer.accumulate_grad_batches
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            scale *= scaler.get_scale()
        self.distiller.set_grad_scale(scale)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.distiller is not None and self.distiller.last is not None and self.optimizer_stepped(trainer):
            log_step(trainer, pl_module, self._values)

    def _values(self) -> dict[str, torch.Tensor]:
        kd, *hints = self.distiller.last
        values = {"distill/kd_loss": kd}
        for (student_name, _), hint in zip(self.distiller.pairs, hints):
            values[f"distill/feature_loss/{student_name}"] = hint
        return values

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self.distiller is None:
            return
        self.distiller.remove()
        self.distiller = None  # the teacher goes with it
        student = network_of(pl_module)
        if isinstance(getattr(student, PROJECTIONS, None), torch.nn.ModuleDict):
            delattr(student, PROJECTIONS)

    # state ------------------------------------------------------------------------------------
    @override
    def technique_state(self) -> dict[str, Any]:
        return {"teacher": self.teacher}

    @override
    def load_technique_state(self, state: dict[str, Any]) -> None:
        saved = state.get("teacher")
        if saved is not None and saved != self.teacher:
            warnings.warn(f"KnowledgeDistillation: resuming a run distilled from teacher={saved!r} with "
                          f"teacher={self.teacher!r}", UserWarning, stacklevel=2)
