"""Progressive layer freezing: stop training the earliest blocks as training goes on."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Hashable, Iterator
from typing import Any, Literal

from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from lit_eff import validation
from lit_eff.callbacks.masking import MaskingTechnique
from lit_eff.callbacks.technique import Technique, log_step
from lit_eff.gradients.freezing import composer_count, first_step, window_count
from lit_eff.gradients.units import Units, find_units, stem_modules, stem_parameters

SCHEDULES = ("window", "composer")
_REFUSED = {"FSDPStrategy": "FSDP1 flattens each unit's parameters into one flat parameter when it wraps the "
                            "model, and requires_grad changes made during training do not reach it",
            "DeepSpeedStrategy": "DeepSpeed partitions the parameters and owns the optimizer step"}


class LayerFreezing(Technique):
    """Freezes the model's earliest units (transformer blocks, a CNN's stages), and with the first
    one its stem, as training goes on: their weights stop changing and their backward disappears.
    Under DDP it needs ``find_unused_parameters=True``. Details: docs/techniques/layer_freezing.md.

    Args:
        final_fraction: fraction of units frozen at the end, in (0, 1].
        freeze_start: fraction of training before freezing starts, in [0, 1].
        freeze_end: (window) fraction of training at which the last unit freezes (default 0.75).
        schedule: ``"window"`` (units freeze at evenly spaced steps) or ``"composer"`` (Composer's schedule).
        freeze_stem: freeze what runs before the first unit together with it.
        frozen_eval: put frozen units (and the frozen stem) in eval mode.
        blocks: dotted name of the ModuleList/Sequential of units (default: found automatically).
        total_steps: optimizer steps the schedule spans; default: the run's.

    Example::

        trainer:
          callbacks+:
            - class_path: lit_eff.callbacks.LayerFreezing
              init_args: {final_fraction: 0.5, freeze_start: 0.25, freeze_end: 0.75}
    """

    def __init__(self, final_fraction: float = 0.5, freeze_start: float = 0.25, freeze_end: float | None = None,
                 schedule: Literal["window", "composer"] = "window", freeze_stem: bool = True,
                 frozen_eval: bool = True, blocks: str | None = None, total_steps: int | None = None) -> None:
        super().__init__()
        validation.check_choice("schedule", schedule, SCHEDULES)
        validation.check_fraction("final_fraction", final_fraction, low_open=True)
        validation.check_fraction("freeze_start", freeze_start)
        if schedule == "composer" and freeze_end is not None:
            raise ValueError(f"Expected no `freeze_end` with schedule='composer' (its last unit freezes at the end "
                             f"of training), got freeze_end={freeze_end!r}")
        end = 0.75 if freeze_end is None else validation.check_fraction("freeze_end", freeze_end)
        if schedule == "window" and end < freeze_start:
            raise ValueError(f"Expected `freeze_start` <= `freeze_end` (0.75 unless set), got "
                             f"freeze_start={freeze_start}, freeze_end={freeze_end}")
        validation.check_bool("freeze_stem", freeze_stem)
        validation.check_bool("frozen_eval", frozen_eval)
        if blocks is not None and (not isinstance(blocks, str) or not blocks):
            raise ValueError(f"Expected `blocks` to be a dotted module name (e.g. 'model.blocks'), "
                             f"got blocks={blocks!r}")
        validation.check_int("total_steps", total_steps, minimum=1, allow_none=True)
        self.final_fraction = float(final_fraction)
        self.freeze_start = float(freeze_start)
        self.freeze_end = None if freeze_end is None else float(freeze_end)
        self.schedule = schedule
        self.freeze_stem = freeze_stem
        self.frozen_eval = frozen_eval
        self.blocks = blocks
        self.total_steps = total_steps
        self.units: Units | None = None
        self.stem: dict[str, nn.Parameter] = {}  # resolved at fit start (FSDP2 replaces parameters)
        self.stem_modules: list[nn.Module] = []
        self.frozen = 0
        self._total: int | None = total_steps
        self._run: int | None = None  # optimizer steps of this fit
        self._trainable = 0  # parameter elements trainable at the start

    def count(self, step: int, total: int | None = None) -> int:
        """Units frozen at optimizer step ``step`` (of a run of ``total`` steps: this one's by default)."""
        total = self._total if total is None else total
        assert self.units is not None and total is not None, "LayerFreezing runs in a Trainer"
        n = len(self.units.names)
        if self.schedule == "composer":
            return composer_count(step, total, n, self.final_fraction, self.freeze_start)
        return window_count(step, total, n, self.final_fraction, self.freeze_start, self.window_end)

    @property
    def window_end(self) -> float:
        """``freeze_end`` of the window schedule (0.75 when not given)."""
        return 0.75 if self.freeze_end is None else self.freeze_end

    def first_freeze_step(self, units: int = 1) -> int:
        """The first optimizer step trained with ``units`` units frozen (at most ``T``)."""
        assert self._total is not None
        step = first_step(self.count, units, self._total)
        return self._total if step is None else step

    def _unit_parameters(self, count: int, stem: dict[str, nn.Parameter] | None = None) -> list[nn.Parameter]:
        assert self.units is not None
        params = [p for unit in self.units.modules[:count] for p in unit.parameters()]
        return params + list((self.stem if stem is None else stem).values()) if count > 0 else params

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.refuse_strategies(trainer, _REFUSED)
        self.units = find_units(pl_module, self.blocks)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.total_steps is None:
            self._total = self._run = self.run_length(trainer, "set `total_steps` or trainer.max_steps")
        else:
            estimated = trainer.estimated_stepping_batches
            self._total = self.total_steps
            self._run = int(estimated) if math.isfinite(estimated) and estimated > 0 else self.total_steps
        model = trainer.strategy.model
        if isinstance(model, DistributedDataParallel) and (model.static_graph or not model.find_unused_parameters):
            raise ValueError("LayerFreezing needs DDP with find_unused_parameters=True (and static_graph=False): "
                             "frozen blocks stop receiving gradients after DDP wrapped the model, which DDP allows "
                             "only when it looks for unused parameters on every step. Set strategy="
                             "'ddp_find_unused_parameters_true' (or 'ddp_spawn_find_unused_parameters_true'), or "
                             "DDPStrategy(find_unused_parameters=True); in YAML: trainer.strategy: {class_path: "
                             "lightning.pytorch.strategies.DDPStrategy, init_args: {find_unused_parameters: true}}")
        assert self.units is not None
        self.stem = stem_parameters(pl_module, self.units) if self.freeze_stem else {}
        frozen_ids = {id(p) for p in self.stem.values()}
        self.stem_modules = [m for m in stem_modules(pl_module, self.units).values()
                             if self.freeze_stem and all(id(p) in frozen_ids for p in m.parameters())]
        n, k = len(self.units.names), self.count(self._total)
        if k == 0:
            raise ValueError(f"Expected `final_fraction` to freeze at least one of the {n} units "
                             f"({self.units.names[0]}, ...), got final_fraction={self.final_fraction}: raise it to "
                             f">= {1 / n:.3g}")
        trainable = [p for p in pl_module.parameters() if p.requires_grad]
        planned = {id(p) for p in self._unit_parameters(k)}
        if all(id(p) in planned for p in trainable):
            raise ValueError(f"LayerFreezing with final_fraction={self.final_fraction} would freeze every trainable "
                             f"parameter of {type(pl_module).__name__} ({k} of {n} units"
                             f"{' and the stem' if self.stem else ''}); lower `final_fraction`")
        self._trainable = sum(p.numel() for p in trainable)
        self._warn_inactive(k)

    def _warn_inactive(self, k: int) -> None:
        assert self._run is not None
        first, last = self.first_freeze_step(1), self.first_freeze_step(k)
        if first >= self._run:
            validation.warn_inactive(self.name, "freeze_start", self.freeze_start, self._run,
                                     f"the first unit freezes at step {first}, after the last step {self._run - 1}")
        elif self.schedule == "window" and last >= self._run:
            validation.warn_inactive(self.name, "freeze_end", self.window_end, self._run,
                                     f"only {self.count(self._run - 1)} of the {k} units freeze before the last "
                                     f"step (the last would freeze at step {last})")

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check_masks(trainer)
        # here, not at fit start: a resumed run has its global_step back by now
        self._freeze(max(self.frozen, self.count(trainer.global_step)))
        self.mark_step(trainer.global_step)

    def _check_masks(self, trainer: Trainer) -> None:
        """Refuse a sparsity callback whose masks on units that freeze change once freezing starts."""
        assert self.units is not None and self._run is not None
        first = self.first_freeze_step(1)
        if first >= self._run:
            return
        freezable = {id(m) for unit in self.units.modules[: self.count(self._total)] for m in unit.modules()}
        for other in self.others(trainer, MaskingTechnique):
            why = any(id(m) in freezable for m in other.targets.values()) and other.mask_changes_after(first, self._run)
            if why:
                raise ValueError(f"{other.describe(trainer)} masks layers that {self.describe(trainer)} freezes from "
                                 f"step {first}, and {why}: frozen layers must keep their masks. Let the sparsity "
                                 f"schedule settle before `freeze_start` or exclude the frozen blocks from it")

    def _freeze(self, count: int) -> None:
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
        if not self.optimizer_stepped(trainer):
            return
        count = self.count(trainer.global_step)
        if count > self.frozen:
            self._freeze(count)
        log_step(trainer, pl_module, lambda: {
            "freezing/frozen_units": float(self.frozen),
            "freezing/frozen_fraction": sum(p.numel() for p in self._unit_parameters(self.frozen))
            / max(1, self._trainable)})

    @override
    def flops_key(self, trainer: Trainer) -> Hashable:
        return self.frozen  # settled at the end of the previous step

    plans_flops = True

    @override
    def plan_state(self, trainer: Trainer, step: int, total: int) -> Hashable:
        return self.count(step, self.total_steps or total)  # the units frozen while step `step` trains

    @override
    @contextlib.contextmanager
    def plan_probe(self, trainer: Trainer, pl_module: LightningModule, state: Hashable, batch: Any) -> Iterator[None]:
        assert self.units is not None
        stem = stem_parameters(pl_module, self.units) if self.freeze_stem else {}
        frozen = [p for p in self._unit_parameters(int(state), stem) if p.requires_grad]  # type: ignore[arg-type]
        for p in frozen:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in frozen:
                p.requires_grad_(True)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(final_fraction=self.final_fraction, blocks=self.blocks)

    @override
    def technique_state(self) -> dict[str, Any]:
        return {"total_steps": self._total, "frozen": self.frozen}

    @override
    def load_technique_state(self, state: dict[str, Any]) -> None:
        self.frozen = int(state.get("frozen", 0))
