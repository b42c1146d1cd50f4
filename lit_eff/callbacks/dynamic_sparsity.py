"""Dynamic sparse training at constant sparsity: RigL (Evci et al. 2020) and SET (Mocanu et al. 2018)."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from typing_extensions import override

from lit_eff import sparsity
from lit_eff.callbacks._checks import check_choice, is_int, is_number, training_steps
from lit_eff.callbacks._claims import refuse_masked
from lit_eff.callbacks._logging import log_step
from lit_eff.schedules import Cosine
from lit_eff.seeding import generator, run_seed
from lit_eff.sparsity.masks import _prune_smallest, validate_sparsity

_METHODS = ("rigl", "set")
_DISTRIBUTIONS = ("uniform", "erk")


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """A mask of the ``k`` largest of ``scores`` (ties: the lower index wins), shaped like it."""
    flat = scores.flatten()
    return _prune_smallest(flat, flat.numel() - k).reshape(scores.shape)


class DynamicSparsity(Callback):
    """Trains at constant sparsity while moving the mask: RigL (grow by gradient) or SET (grow at random).

    **Init** (``setup``): each targeted layer gets a random mask at its density (``uniform``: every
    layer at ``1 − sparsity``; ``erk``: Erdős–Rényi-Kernel, ALGORITHMS.md §4), drawn from
    ``lit_eff.seeding.generator(run_seed, "rigl-init", layer)`` so every DDP rank has the same mask;
    the dense weights at pruned positions are set to zero.

    **Update** after the optimizer step that reaches step ``t`` with ``0 < t < T_end`` and
    ``t % update_every == 0`` (``T_end = int(stop_fraction · total steps)``), per layer with
    ``n`` active weights::

        α_t = drop_fraction · (0.5 + 0.5 · cos(π · t / T_end))       k = ⌊α_t · n⌋

    drop the ``k`` active weights of smallest ``|W|``, then grow ``k`` positions among all the
    others (just-dropped ones included) with the largest ``|∇W|`` of the dense gradient of that
    step (``rigl``) or at random from ``generator(run_seed, t, "set", layer)`` (``set``). Ties go
    to the lower index. A grown position was inactive, so its weight and optimizer state are
    exactly zero; a dropped weight that is grown back keeps its value (it never left). The count
    of active weights of every layer never changes.

    **Gradients.** Forward reads ``W ⊙ M`` (a :mod:`lit_eff.sparsity` mask with the plain
    masked gradient), so pruned positions get an exact zero gradient and, with the dense weights
    and their optimizer state zeroed at every mask update, stay exactly zero. On the optimizer
    step before a RigL update, forward reads ``W`` as is instead (the same value: ``W`` is zero
    at pruned positions), so ``W.grad`` is the dense gradient ``∂L/∂(W ⊙ M)``; it is copied in
    ``on_before_optimizer_step`` (after accumulation, AMP unscaling and the DDP all-reduce, so
    every rank sees the same one) and then multiplied by ``M``.

    Logs ``sparsity/drop_fraction`` (``α_t`` at the current step, 0 from ``T_end`` on) and
    ``sparsity/mask_changes`` (grown positions over active positions, all layers, at the last
    update) every optimizer step. Each layer reports its density to ``FlopsMonitor``.

    Runs on: ``setup`` (targets, claims, random masks, ``T_end`` from ``max_steps``),
    ``on_fit_start`` (``T_end`` from the estimated steps), ``on_train_start`` (weights and
    optimizer state masked), ``on_train_batch_start`` and ``on_before_optimizer_step`` (the
    dense gradient before a RigL update), ``on_train_batch_end`` when ``trainer.global_step``
    advanced (update if due, logging).

    Args:
        sparsity: overall fraction of pruned weights among the targets, in [0, 1).
        method: ``"rigl"`` or ``"set"``.
        distribution: ``"uniform"`` or ``"erk"`` layer densities.
        update_every: ``ΔT``, optimizer steps between mask updates.
        drop_fraction: ``α0``, in (0, 1].
        stop_fraction: updates stop at ``T_end = stop_fraction ×`` the number of training steps
            (``trainer.max_steps``, else ``trainer.estimated_stepping_batches``), in (0, 1].
        include: name globs of the layers to make sparse (default: Linear layers in ``*blocks.*``).
        exclude: name globs of layers to leave dense.

    Example::

        trainer:
          callbacks+:
            - class_path: lit_eff.callbacks.DynamicSparsity
              init_args: {sparsity: 0.9, method: rigl, distribution: erk, update_every: 100}
    """

    def __init__(
        self,
        sparsity: float,
        method: Literal["rigl", "set"] = "rigl",
        distribution: Literal["uniform", "erk"] = "uniform",
        update_every: int = 100,
        drop_fraction: float = 0.3,
        stop_fraction: float = 0.75,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
    ) -> None:
        if not is_number(sparsity):
            raise ValueError(f"Expected `sparsity` to be a number in [0, 1), got sparsity={sparsity!r}")
        validate_sparsity(sparsity, "sparsity")
        check_choice("method", method, _METHODS)
        check_choice("distribution", distribution, _DISTRIBUTIONS)
        if not is_int(update_every) or update_every < 1:
            raise ValueError(f"Expected `update_every` to be an integer >= 1, got update_every={update_every!r}")
        for name, value in (("drop_fraction", drop_fraction), ("stop_fraction", stop_fraction)):
            if not is_number(value) or not 0.0 < value <= 1.0:
                raise ValueError(f"Expected `{name}` in (0, 1], got {name}={value!r}")
        for name, value in (("include", include), ("exclude", exclude)):
            if value is not None and (isinstance(value, str) or not all(isinstance(p, str) for p in value)):
                raise ValueError(f"Expected `{name}` to be a list of name patterns (strings), got {name}={value!r}")
        self.sparsity = float(sparsity)
        self.method = method
        self.distribution = distribution
        self.update_every = update_every
        self.drop_fraction = float(drop_fraction)
        self.stop_fraction = float(stop_fraction)
        self.include = None if include is None else list(include)
        self.exclude = None if exclude is None else list(exclude)

        self.targets: dict[str, nn.Module] = {}
        self.group: sparsity.MaskGroup | None = None
        self.densities: dict[str, float] = {}
        self.active: dict[str, int] = {}  # active weights per layer (constant)
        self._end: int | None = None  # T_end
        self._last_step = -1  # global_step whose post-step work is done
        self._last_update: int | None = None
        self._mask_changes = 0.0
        self._grads: dict[str, torch.Tensor] = {}

    # schedule -----------------------------------------------------------------------------------
    @property
    def end_step(self) -> int:
        """``T_end``, resolved when the fit starts."""
        if self._end is None:
            raise RuntimeError("DynamicSparsity's stop step is not resolved yet: run it in a Trainer")
        return self._end

    def is_update(self, step: int) -> bool:
        """Whether the masks move after the optimizer step that reaches ``step``."""
        return 0 < step < self.end_step and step % self.update_every == 0

    def alpha(self, step: int) -> float:
        """``α_t``: the cosine-decayed drop fraction (0 from ``T_end`` on)."""
        if step >= self.end_step:
            return 0.0
        return Cosine(self.drop_fraction, 0.0, 0, self.end_step)(step)

    # setup ----------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        targets = sparsity.find_targets(pl_module, include=self.include, exclude=self.exclude)
        refuse_masked(trainer, self, targets, self.targets)
        shapes = {name: tuple(module.weight.shape) for name, module in targets.items()}
        spread = sparsity.erk_densities if self.distribution == "erk" else sparsity.uniform_densities
        densities = spread(shapes, 1.0 - self.sparsity)
        seed = run_seed()
        for name, module in targets.items():
            if sparsity.has_mask(module):  # ours, from an earlier setup
                continue
            weight = module.weight
            mask = sparsity.random_mask(weight.shape, densities[name], generator(seed, "rigl-init", name))
            mask = mask.to(weight.device)
            with torch.no_grad():
                weight.mul_(mask)
            count = int(mask.sum())
            sparsity.attach_mask(module, mask=mask, ste=False, density=count / mask.numel())
        self.targets = targets
        self.group = sparsity.MaskGroup(targets)
        self.densities = densities
        self.active = {name: int(sparsity.get_mask(module).sum()) for name, module in targets.items()}
        if self._end is None and trainer.max_steps is not None and trainer.max_steps > 0:
            self._end = int(self.stop_fraction * trainer.max_steps)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._end is None:
            self._end = int(self.stop_fraction * training_steps(trainer, "DynamicSparsity", "set trainer.max_steps"))

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # here, not in on_fit_start: global_step and the optimizer state are restored by now
        self._enforce(trainer)
        self.group.pass_through(False)
        self._last_step = trainer.global_step

    # masks ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _update(self, step: int) -> None:
        alpha = self.alpha(step)
        grown_total = 0
        for name, module in self.targets.items():
            weight = module.parametrizations.weight.original
            mask = sparsity.get_mask(module)
            n = self.active[name]
            k = math.floor(alpha * n)
            if k == 0:
                continue
            # drop: keep the n - k active weights of largest |W|
            kept = _top(torch.where(mask, weight.abs().float(), -1.0), n - k)
            # grow: k among the not-kept positions
            if self.method == "rigl":
                grad = self._grads.get(name)
                scores = grad.abs().float() if grad is not None else torch.zeros(mask.shape, device=mask.device)
            else:
                scores = torch.rand(mask.shape, generator=generator(run_seed(), step, "set", name)).to(mask.device)
            grown = _top(torch.where(kept, -1.0, scores), k)
            new = kept | grown
            grown_total += int((new & ~mask).sum())
            sparsity.set_mask(module, new, density=n / new.numel())
        self._grads = {}
        self._mask_changes = grown_total / max(1, sum(self.active.values()))
        self._last_update = step

    def _enforce(self, trainer: Trainer) -> None:
        """Zero the dense weights and their optimizer state at pruned positions (at the start
        and when masks change). In between nothing is needed: forward multiplies ``W`` by the
        mask, so autograd gives pruned positions an exact 0 gradient, their momentum and Adam
        moments stay 0, and the update there is 0 (weight decay of a zero weight is zero too)."""
        self.group.zero_pruned(trainer.optimizers)

    # hooks ----------------------------------------------------------------------------------
    def _captures(self, trainer: Trainer) -> bool:
        """Whether the optimizer step now running precedes a RigL update (global_step still
        counts the steps before it): its dense gradient decides regrowth."""
        return self.method == "rigl" and self.is_update(trainer.global_step + 1)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._captures(trainer):
            # forward reads W as is (W is zero at pruned positions, so the value is the same):
            # W.grad is then the dense gradient ∂L/∂(W ⊙ M) at every position
            self.group.pass_through(True)

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if not self._captures(trainer):
            return  # forward multiplied by M: pruned positions already have a zero gradient
        for name, module in self.targets.items():
            grad = module.parametrizations.weight.original.grad
            if grad is not None:
                self._grads[name] = grad.detach().clone()
        self.group.mask_gradients()
        self.group.pass_through(False)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step <= self._last_step:
            return  # accumulating micro-batches
        if self.is_update(step) and self._last_update != step:
            self._update(step)
            self._enforce(trainer)
        self._last_step = step
        log_step(trainer, pl_module, {"sparsity/drop_fraction": self.alpha(step),
                                      "sparsity/mask_changes": self._mask_changes})

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # the masks stay: they are the trained state (lit_eff.sparsity.export hardens them)
        self._grads = {}

    # state ----------------------------------------------------------------------------------
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(sparsity=self.sparsity, method=self.method, distribution=self.distribution,
                                        include=self.include, exclude=self.exclude)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"end_step": self._end, "last_step": self._last_step, "last_update": self._last_update,
                "mask_changes": self._mask_changes}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("end_step") is not None:
            self._end = int(state_dict["end_step"])
        self._last_step = int(state_dict.get("last_step", -1))
        last_update = state_dict.get("last_update")
        self._last_update = None if last_update is None else int(last_update)
        self._mask_changes = float(state_dict.get("mask_changes", 0.0))
