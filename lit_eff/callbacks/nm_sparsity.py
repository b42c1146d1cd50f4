"""N:M weight sparsity during training: STE, SR-STE and progressive gradient flow."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from typing_extensions import override

from lit_eff import sparsity
from lit_eff.callbacks._checks import check_choice, training_steps
from lit_eff.callbacks._claims import refuse_masked
from lit_eff.callbacks._logging import log_step
from lit_eff.sparsity.masks import validate_nm

_METHODS = ("ste", "srste", "mask_decay")
_DECAYS = ("linear", "exp")
_STRUCTURE_DECAYS = ("none", "stepwise", "geometric")


def _check_steps(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"Expected `{name}` to be an integer >= 0, got {name}={value!r}")


def _is_power_of_two(value: int) -> bool:
    return value >= 1 and value & (value - 1) == 0


class NMSparsity(Callback):
    """Trains with N:M sparse weights: ``n`` of every ``m`` consecutive input weights kept.

    Each targeted layer's ``weight`` reads ``W ⊙ (E + β(1−E))`` in forward (a
    :mod:`lit_eff.sparsity` parametrization: ``W`` is the dense weight the optimizer updates,
    ``E`` the N:M mask of ``|W|``, ``β`` the scale of pruned weights), with a straight-through
    gradient to all of ``W``. Methods (ALGORITHMS.md §0, §1):

    - ``"ste"``: binary mask (β = 0), plain straight-through gradient;
    - ``"srste"``: binary mask plus the SR-STE term ``λ(1−E)⊙W`` added to ``W``'s gradient;
    - ``"mask_decay"`` (MDGF): β decays from 1 to 0 with ``t = global_step − dense_steps``:
      ``max(0, 1 − α·t)`` (``decay="linear"``) or ``exp(−α·t)`` (``decay="exp"``).

    ``structure_decay`` (SDGF) steps the pattern from dense toward ``n:m`` over the decay phase
    (the steps between ``dense_steps`` and ``total_steps − finetune_steps``), frame ``i`` of
    ``K`` starting at ``dense_steps + ⌊i·P/K⌋``: ``"stepwise"`` uses ``(m−1):m`` then
    ``(m/2^i):m`` (``K = log2(m/n) + 1``; 1:8 gives 7:8, 4:8, 2:8, 1:8); ``"geometric"`` uses
    ``(n·2^(3−i)):(m·2^(3−i))`` (``K = 4``; 1:8 gives 8:64, 4:32, 2:16, 1:8). The first
    ``dense_steps`` train dense (all-ones mask); the last ``finetune_steps`` use the final
    ``n:m`` binary mask (β = 0) whatever the method.

    The mask is recomputed from the dense weight once per optimizer step, right after the step
    (and at the start of training), so checkpoints and validation see the mask of the current
    weights. Everything follows from ``trainer.global_step`` and the weights; masks and β live
    in module buffers and travel with the checkpoint. The density reported for FLOP counting
    (``FlopsMonitor``'s effective FLOPs) is ``n/m`` of the current frame while β = 0, else 1.

    Logs ``sparsity/beta``, ``sparsity/n``, ``sparsity/m`` (current frame) and
    ``sparsity/density`` every optimizer step.

    At the end of training the masks stay on the model (they are the trained state; a
    checkpoint holds the dense weights, masks and β). ``lit_eff.sparsity.export(model)``
    hardens them into plain weights and removes the machinery.

    Runs on: ``setup`` (finds the targets, checks them, attaches all-ones masks before the
    strategy wraps the model and before a checkpoint restore), ``on_fit_start`` and
    ``on_train_start`` (resolve ``total_steps``; masks and β for the current step),
    ``on_before_optimizer_step`` (SR-STE term, once per optimizer step, after accumulation
    and AMP unscaling, before clipping), ``on_train_batch_end`` (after an optimizer step:
    new masks, β and frame; logging).

    Args:
        n: weights kept in every group (target pattern).
        m: group size along the input dimension; must divide every target's input size.
        method: ``"ste"``, ``"srste"`` or ``"mask_decay"``.
        srste_lambda: λ of the SR-STE term (``method="srste"``).
        decay: β schedule of ``method="mask_decay"``: ``"linear"`` or ``"exp"``.
        decay_rate: α of the β schedule (per optimizer step).
        structure_decay: ``"none"``, ``"stepwise"`` or ``"geometric"``.
        dense_steps: optimizer steps of dense warm-up before masking starts.
        finetune_steps: last optimizer steps trained with the final binary mask.
        total_steps: length of training in optimizer steps; ``None`` takes ``trainer.max_steps``
            (or ``trainer.estimated_stepping_batches`` when ``max_steps`` is unset).
        include: name globs of the layers to mask (default: Linear layers inside ``*blocks.*``).
        exclude: name globs of layers to leave dense.

    Example::

        trainer:
          callbacks+:
            - class_path: lit_eff.callbacks.NMSparsity
              init_args: {n: 2, m: 4, method: srste}
    """

    def __init__(
        self,
        n: int = 2,
        m: int = 4,
        method: Literal["ste", "srste", "mask_decay"] = "srste",
        srste_lambda: float = 2e-4,
        decay: Literal["linear", "exp"] = "exp",
        decay_rate: float = 2e-4,
        structure_decay: Literal["none", "stepwise", "geometric"] = "none",
        dense_steps: int = 0,
        finetune_steps: int = 0,
        total_steps: int | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
    ) -> None:
        validate_nm(n, m)
        check_choice("method", method, _METHODS)
        check_choice("decay", decay, _DECAYS)
        check_choice("structure_decay", structure_decay, _STRUCTURE_DECAYS)
        if not srste_lambda >= 0:
            raise ValueError(f"Expected `srste_lambda` >= 0, got srste_lambda={srste_lambda}")
        if not decay_rate > 0:
            raise ValueError(f"Expected `decay_rate` > 0, got decay_rate={decay_rate}")
        _check_steps("dense_steps", dense_steps)
        _check_steps("finetune_steps", finetune_steps)
        if total_steps is not None:
            if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
                raise ValueError(f"Expected `total_steps` to be an integer > 0 or None, got total_steps={total_steps!r}")
            self._check_phases(dense_steps, finetune_steps, total_steps)
        if structure_decay == "stepwise" and (m % n or not _is_power_of_two(m // n)):
            raise ValueError(f"Expected `m / n` to be a power of 2 with structure_decay='stepwise' "
                             f"(frames (m-1):m, m/2:m, ..., n:m), got n={n}, m={m}")
        for name, value in (("include", include), ("exclude", exclude)):
            if value is not None and (isinstance(value, str) or not all(isinstance(p, str) for p in value)):
                raise ValueError(f"Expected `{name}` to be a list of name patterns (strings), got {name}={value!r}")
        self.n, self.m = n, m
        self.method = method
        self.srste_lambda = float(srste_lambda)
        self.decay = decay
        self.decay_rate = float(decay_rate)
        self.structure_decay = structure_decay
        self.dense_steps = dense_steps
        self.finetune_steps = finetune_steps
        self.total_steps = total_steps
        self.include = None if include is None else list(include)
        self.exclude = None if exclude is None else list(exclude)

        self.targets: dict[str, nn.Module] = {}
        self.group: sparsity.MaskGroup | None = None
        self._total: int | None = total_steps
        self._last_step = -1  # global_step the masks were last computed for
        self._current: tuple[float, int, int, float] = (1.0, m, m, 1.0)  # beta, n, m, density

    @staticmethod
    def _check_phases(dense_steps: int, finetune_steps: int, total_steps: int) -> None:
        if dense_steps + finetune_steps > total_steps:
            raise ValueError(f"Expected `dense_steps` + `finetune_steps` <= `total_steps`, got dense_steps={dense_steps}, "
                             f"finetune_steps={finetune_steps}, total_steps={total_steps}")

    # schedules (functions of the optimizer step) ---------------------------------------------
    def frames(self) -> list[tuple[int, int]]:
        """The N:M patterns of the decay phase, in order (one frame without structure decay)."""
        n, m = self.n, self.m
        if self.structure_decay == "stepwise":
            k = int(math.log2(m // n)) + 1
            return [(m - 1, m)] + [(m >> i, m) for i in range(1, k)]
        if self.structure_decay == "geometric":
            return [(n * 2 ** (3 - i), m * 2 ** (3 - i)) for i in range(4)]
        return [(n, m)]

    def _total_steps(self) -> int:
        if self._total is None:
            raise RuntimeError("NMSparsity.total_steps is not resolved yet: pass `total_steps` or run it in a Trainer")
        return self._total

    def phase(self, step: int) -> Literal["dense", "decay", "finetune"]:
        """``"dense"`` (warm-up), ``"decay"`` or ``"finetune"`` at optimizer step ``step``."""
        if step < self.dense_steps:
            return "dense"
        if step >= self._total_steps() - self.finetune_steps:
            return "finetune"
        return "decay"

    def frame(self, step: int) -> tuple[int, int]:
        """The ``(n, m)`` pattern at ``step`` (``(m, m)``, i.e. dense, during warm-up)."""
        phase = self.phase(step)
        if phase == "dense":
            return self.m, self.m
        if phase == "finetune":
            return self.n, self.m
        frames = self.frames()
        span = self._total_steps() - self.finetune_steps - self.dense_steps
        offset = step - self.dense_steps
        index = max(i for i in range(len(frames)) if i * span // len(frames) <= offset)
        return frames[index]

    def beta(self, step: int) -> float:
        """β (the scale of pruned weights) at ``step``: 1 in warm-up, 0 for binary masks."""
        phase = self.phase(step)
        if phase == "dense":
            return 1.0
        if phase == "finetune" or self.method != "mask_decay":
            return 0.0
        t = step - self.dense_steps
        if self.decay == "linear":
            return max(0.0, 1.0 - self.decay_rate * t)
        return math.exp(-self.decay_rate * t)

    # setup ----------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        targets = sparsity.find_targets(pl_module, include=self.include, exclude=self.exclude)
        ms = sorted({m for _, m in self.frames()} | {self.m})
        for name, module in targets.items():
            inputs = module.weight.shape[1]  # groups run along input features / channels
            for m in ms:
                if inputs % m:
                    frame = "" if m == self.m else f" (a {self.structure_decay} structure-decay frame)"
                    raise ValueError(f"Expected `m` to divide the input size of layer `{name}` (weight shape "
                                     f"{tuple(module.weight.shape)}), got m={m}{frame} for {inputs} inputs; "
                                     f"exclude it (exclude=[{name!r}]) or choose another `m`")
            refuse_masked(trainer, self, {name: module}, self.targets)
        for name, module in targets.items():
            if not sparsity.has_mask(module):
                sparsity.attach_mask(module, density=1.0)  # dense until the first step is set up
        self.targets = targets
        self.group = sparsity.MaskGroup(targets)
        if self._total is None and trainer.max_steps is not None and trainer.max_steps > 0:
            self._total = trainer.max_steps
        if self._total is not None:
            self._check_phases(self.dense_steps, self.finetune_steps, self._total)

    def _resolve_total(self, trainer: Trainer) -> None:
        if self._total is None:
            self._total = training_steps(trainer, "NMSparsity", "set `total_steps` or trainer.max_steps")
            self._check_phases(self.dense_steps, self.finetune_steps, self._total)

    # masks ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _apply(self, step: int) -> None:
        """Masks, β and reported density for optimizer step ``step``, from the current weights.

        All targets' masks are ranked in one batch (:func:`lit_eff.sparsity.nm_masks`); β is
        written only when it changes.
        """
        n, m = self.frame(step)
        beta = self.beta(step)
        if n == m:
            masks = [torch.ones_like(p.mask) for p in self.group.params]
        else:
            masks = self.group.nm_masks(n, m)
        self.group.set_masks(masks, density=n / m)
        self.group.set_beta(beta)
        self._last_step = step
        self._current = (beta, n, m, n / m if beta == 0 else 1.0)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._resolve_total(trainer)
        self._apply(trainer.global_step)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # again: strategies that restore the checkpoint after on_fit_start (FSDP) load older masks
        self._resolve_total(trainer)
        self._apply(trainer.global_step)

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if self.method != "srste" or self.srste_lambda == 0 or self.phase(trainer.global_step) == "dense":
            return
        self.group.add_pruned_weights_to_grad(self.srste_lambda)  # grad += λ (1 − E) ⊙ W, fused

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step <= self._last_step:
            return  # accumulating micro-batches
        beta, n, m, density = self._current  # what the step that just finished used
        log_step(trainer, pl_module, {"sparsity/beta": beta, "sparsity/n": float(n), "sparsity/m": float(m),
                                      "sparsity/density": density})
        self._apply(trainer.global_step)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # the masks stay: they are the trained state (lit_eff.sparsity.export hardens them)
        pass

    # state ----------------------------------------------------------------------------------
    @property
    @override
    def state_key(self) -> str:
        # two instances on different layers of one model keep separate checkpoint entries
        return self._generate_state_key(n=self.n, m=self.m, method=self.method, include=self.include,
                                        exclude=self.exclude)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step, "total_steps": self._total}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = int(state_dict.get("last_step", -1))
        if self.total_steps is None and state_dict.get("total_steps") is not None:
            self._total = int(state_dict["total_steps"])
