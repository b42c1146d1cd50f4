"""Progressive layer freezing (FreezeOut / Composer LayerFreezing): stop training the earliest blocks."""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lit_eff.callbacks._checks import is_int, training_steps
from lit_eff.callbacks._claims import describe_in
from lit_eff.callbacks._logging import log_step
from lit_eff.callbacks.gradient_masking import refuse_sharded
from lit_eff.gradients.freezing import Units, find_units, frozen_count, stem_modules, stem_parameters, validate_fraction


class LayerFreezing(Callback):
    """Freezes the earliest blocks one by one as training goes on.

    ``k = floor(final_fraction · n)`` of the model's ``n`` units freeze, earliest first, at
    evenly spaced optimizer steps from ``freeze_start · T`` (the first) to ``freeze_end · T``
    (the ``k``-th), ``T`` the number of training steps (:func:`lit_eff.gradients.frozen_count`).
    Units are transformer ``blocks`` (timm ViT, the kit's GPT), ``stages``/``layers``, or a
    ResNet's stages ``layer1..layer4`` (:func:`lit_eff.gradients.find_units`; ``blocks`` names
    another container).

    With ``freeze_stem`` (default) the stem freezes with the first unit: the patch embedding,
    class token and position embedding of a ViT, the position embedding of the GPT (its token
    embedding is tied to the LM head and stays trainable), a CNN's first convolutions. Then
    nothing before a frozen unit needs a gradient, and autograd skips the frozen units'
    backward entirely (input and weight gradients). With a trainable stem (or the GPT's tied
    token embedding) only the frozen units' weight gradients disappear.

    Frozen parameters get ``requires_grad = False`` and ``grad = None``: the optimizer skips
    them (no update, no weight decay) and their weights stay bit-identical; their optimizer
    state stays in the optimizer and in checkpoints. Frozen units are put in eval mode
    (``frozen_eval=True``), and so are the stem's modules (embedding dropout included) once they
    freeze: BatchNorm statistics stop changing and dropout is off there.
    Which units are frozen follows from ``trainer.global_step``, so a resumed run re-freezes
    exactly the same units.

    Under DDP, parameters stop receiving gradients after DDP wrapped the model, so this callback
    switches the strategy to ``find_unused_parameters=True`` at ``setup`` (a small per-step
    cost; the frozen parameters' all-reduce traffic remains). FSDP/DeepSpeed are refused: they
    need uniform ``requires_grad`` within a flat parameter. A schedule that would freeze every
    trainable parameter, or no unit at all, is refused. Frozen layers keep their sparsity masks:
    a sparsity callback whose masks on these units still change once freezing starts
    (MagnitudePruning or DynamicSparsity updating later, an NMSparsity frame or β still moving,
    a StaticSparsity release)
    is refused at the start of training.

    Logs ``freezing/frozen_units`` and ``freezing/frozen_fraction`` (frozen share of the
    parameters trainable at the start) on the steps Lightning writes (``log_every_n_steps``).

    Args:
        final_fraction: fraction of units frozen at the end, in (0, 1].
        freeze_start: fraction of training at which the first unit freezes, in [0, 1].
        freeze_end: fraction of training at which the last one freezes, in [freeze_start, 1].
        freeze_stem: freeze what runs before the first unit together with it.
        frozen_eval: put frozen units in eval mode.
        blocks: dotted name of the ModuleList/Sequential of units (default: found automatically).
        total_steps: ``T``; default ``trainer.max_steps`` or ``trainer.estimated_stepping_batches``.

    Example::

        trainer:
          callbacks+:
            - class_path: lit_eff.callbacks.LayerFreezing
              init_args: {final_fraction: 0.5, freeze_start: 0.25, freeze_end: 0.75}
    """

    def __init__(
        self,
        final_fraction: float = 0.5,
        freeze_start: float = 0.25,
        freeze_end: float = 0.75,
        freeze_stem: bool = True,
        frozen_eval: bool = True,
        blocks: str | None = None,
        total_steps: int | None = None,
    ) -> None:
        validate_fraction(final_fraction, "final_fraction", low_open=True)
        validate_fraction(freeze_start, "freeze_start")
        validate_fraction(freeze_end, "freeze_end")
        if freeze_end < freeze_start:
            raise ValueError(f"Expected `freeze_start` <= `freeze_end`, got freeze_start={freeze_start}, "
                             f"freeze_end={freeze_end}")
        for name, value in (("freeze_stem", freeze_stem), ("frozen_eval", frozen_eval)):
            if not isinstance(value, bool):
                raise ValueError(f"Expected `{name}` to be true or false, got {name}={value!r}")
        if blocks is not None and (not isinstance(blocks, str) or not blocks):
            raise ValueError(f"Expected `blocks` to be a dotted module name (e.g. 'model.blocks'), got blocks={blocks!r}")
        if total_steps is not None and (not is_int(total_steps) or total_steps < 1):
            raise ValueError(f"Expected `total_steps` to be an integer >= 1 or None, got total_steps={total_steps!r}")
        self.final_fraction = float(final_fraction)
        self.freeze_start = float(freeze_start)
        self.freeze_end = float(freeze_end)
        self.freeze_stem = freeze_stem
        self.frozen_eval = frozen_eval
        self.blocks = blocks
        self.total_steps = total_steps

        self.units: Units | None = None
        self.stem: dict[str, nn.Parameter] = {}
        self.stem_modules: list[nn.Module] = []
        self.frozen = 0  # units frozen now
        self._total: int | None = total_steps
        self._last_step = -1
        self._trainable = 0  # parameters (elements) trainable at the start

    # schedule -------------------------------------------------------------------------------
    def _require_total(self) -> int:
        if self._total is None:
            raise RuntimeError("LayerFreezing.total_steps is not resolved yet: pass `total_steps` or run it in a Trainer")
        return self._total

    def count(self, step: int) -> int:
        """Units frozen at optimizer step ``step``."""
        assert self.units is not None
        return frozen_count(step, self._require_total(), len(self.units.names), self.final_fraction,
                            self.freeze_start, self.freeze_end)

    def first_freeze_step(self) -> int:
        return int(self.freeze_start * self._require_total())

    def _unit_parameters(self, count: int) -> list[nn.Parameter]:
        assert self.units is not None
        params = [p for unit in self.units.modules[:count] for p in unit.parameters()]
        return params + list(self.stem.values()) if count > 0 else params

    # setup ----------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        refuse_sharded(trainer, "LayerFreezing", "frozen and trainable parameters cannot share a flat parameter "
                                                 "(it needs uniform requires_grad)")
        units = find_units(pl_module, self.blocks)
        n = len(units.names)
        k = math.floor(self.final_fraction * n + 1e-9)
        if k == 0:
            raise ValueError(f"Expected `final_fraction` to freeze at least one of the {n} units ({units.names[0]}, "
                             f"...), got final_fraction={self.final_fraction}: raise it to >= {1 / n:.3g}")
        self.units = units
        self.stem = stem_parameters(pl_module, units) if self.freeze_stem else {}
        # stem children whose parameters all freeze (the GPT's tied token embedding keeps training)
        frozen_ids = {id(p) for p in self.stem.values()}
        self.stem_modules = [m for m in stem_modules(pl_module, units).values() if self.freeze_stem
                             and all(id(p) in frozen_ids for p in m.parameters())]
        trainable = [p for p in pl_module.parameters() if p.requires_grad]
        planned = {id(p) for p in self._unit_parameters(k)}
        if all(id(p) in planned for p in trainable):
            raise ValueError(f"LayerFreezing with final_fraction={self.final_fraction} would freeze every trainable "
                             f"parameter of {type(pl_module).__name__} ({k} of {n} units"
                             f"{' and the stem' if self.stem else ''}); lower `final_fraction`")
        self._trainable = sum(p.numel() for p in trainable)
        if self._total is None and trainer.max_steps is not None and trainer.max_steps > 0:
            self._total = trainer.max_steps
        ddp_kwargs = getattr(trainer.strategy, "_ddp_kwargs", None)
        if isinstance(ddp_kwargs, dict) and not ddp_kwargs.get("find_unused_parameters", False):
            ddp_kwargs["find_unused_parameters"] = True  # before the strategy wraps the model
            rank_zero_info("LayerFreezing: DDP set to find_unused_parameters=True (frozen parameters get no gradient)")

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._total is None:
            self._total = training_steps(trainer, "LayerFreezing", "set `total_steps` or trainer.max_steps")

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check_sparsity(trainer)
        # here, not in on_fit_start: global_step is restored by now
        self._freeze(max(self.frozen, self.count(trainer.global_step)))
        self._last_step = trainer.global_step

    def _check_sparsity(self, trainer: Trainer) -> None:
        """Refuse a sparsity callback whose masks on freezable units change after freezing starts."""
        assert self.units is not None
        k = self.count(self._require_total())
        freezable = {id(m) for unit in self.units.modules[:k] for m in unit.modules()}
        first, total = self.first_freeze_step(), self._require_total()
        for cb in trainer.callbacks:
            targets = getattr(cb, "targets", None)
            if cb is self or not isinstance(targets, dict) or not any(id(m) in freezable for m in targets.values()):
                continue
            why = None
            if hasattr(cb, "frame") and hasattr(cb, "beta"):  # NMSparsity
                last = max(first, total - 1)
                if cb.frame(first) != cb.frame(last) or cb.beta(first) != cb.beta(last):
                    why = (f"its N:M frame/β moves from {cb.frame(first)}/{cb.beta(first):g} at step {first} to "
                           f"{cb.frame(last)}/{cb.beta(last):g} at step {last}")
            elif hasattr(cb, "is_update"):  # DynamicSparsity: updates at steps < end_step
                if cb.end_step > first:
                    why = f"it updates masks until step {cb.end_step}"
            elif hasattr(cb, "resolved_release_step"):  # StaticSparsity: fixed mask, all-ones after the release
                release = cb.resolved_release_step
                if release is not None and release >= first:
                    why = f"it releases its masks at step {release}"
            elif getattr(cb, "_end", None) is not None and hasattr(cb, "update_step"):  # MagnitudePruning
                if cb._end >= first:
                    why = f"it updates masks until step {cb._end} (end_step)"
            else:
                rank_zero_warn(f"LayerFreezing cannot tell whether {describe_in(trainer, cb)} changes masks of "
                               f"layers it freezes; frozen layers keep their weights but maybe not their masks")
            if why:
                raise ValueError(f"{describe_in(trainer, cb)} masks layers that {describe_in(trainer, self)} "
                                 f"freezes from step {first}, and {why}: frozen layers must keep their masks. "
                                 f"Let the sparsity schedule settle before `freeze_start` or exclude the "
                                 f"frozen blocks from it")

    # freezing -------------------------------------------------------------------------------
    def _freeze(self, count: int) -> None:
        assert self.units is not None
        for param in self._unit_parameters(count):
            if param.requires_grad:
                param.requires_grad_(False)
                param.grad = None
        self.frozen = count
        self._eval_frozen()

    def _eval_frozen(self) -> None:
        if self.frozen_eval and self.units is not None and self.frozen > 0:
            for module in [*self.stem_modules, *self.units.modules[: self.frozen]]:
                module.eval()

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_frozen()

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step <= self._last_step:
            return  # accumulating micro-batches
        self._last_step = step
        count = self.count(step)
        if count > self.frozen:
            self._freeze(count)
        log_step(trainer, pl_module, lambda: {
            "freezing/frozen_units": float(self.frozen),
            "freezing/frozen_fraction": sum(p.numel() for p in self._unit_parameters(self.frozen))
            / max(1, self._trainable)})

    # state ----------------------------------------------------------------------------------
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(final_fraction=self.final_fraction, blocks=self.blocks)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"total_steps": self._total, "frozen": self.frozen, "last_step": self._last_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.total_steps is None and state_dict.get("total_steps") is not None:
            self._total = int(state_dict["total_steps"])
        self.frozen = int(state_dict.get("frozen", 0))
        self._last_step = int(state_dict.get("last_step", -1))
