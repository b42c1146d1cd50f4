"""Gradual magnitude pruning (Zhu & Gupta 2017): the polynomial sparsity schedule."""

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
from lit_eff.schedules import Polynomial
from lit_eff.sparsity.masks import validate_nm, validate_sparsity

_SCOPES = ("layer", "global")
_STRUCTURES = ("unstructured", "nm")


class MagnitudePruning(Callback):
    """Prunes the smallest-magnitude weights gradually, on Zhu & Gupta's polynomial schedule.

    At the update steps ``t ∈ {t0, t0+Δt, t0+2Δt, ...}`` before ``end_step`` (``t0`` =
    ``start_step``, ``Δt`` = ``update_every``) the target sparsity is (ALGORITHMS.md §9)::

        s_t = s_f + (s_i − s_f) · (1 − (t − t0) / (end_step − t0)) ** power

    (:class:`lit_eff.schedules.Polynomial`), held until the next update; at ``end_step`` and
    afterwards it is ``s_f``. Before ``start_step`` the model is dense. Each update prunes
    exactly ``round(s_t · numel)`` weights of every targeted layer (``scope="layer"``) or of all
    targets together with one threshold (``scope="global"``), the smallest ``|W|`` of the
    currently effective weights. Masks only grow sparser: a weight pruned earlier ranks below
    every kept weight, so it stays pruned.

    ``structure="nm"``: every update also keeps the ``n`` largest of each group of ``m``
    consecutive input weights (the N:M mask of the current weights is never pruned), so the
    schedule's sparsity is reached on top of an N:M floor; ``final_sparsity`` must be
    ``1 − n/m``, and the update at ``end_step`` leaves exactly ``n`` of every ``m``.

    Pruned weights stay exactly zero: forward reads ``W ⊙ M`` (a :mod:`lit_eff.sparsity` mask
    with the plain masked gradient, one multiply per layer), so autograd gives pruned positions
    an exact zero gradient; at every mask change the dense weight and every optimizer-state
    tensor of its shape (AdamW ``exp_avg``/``exp_avg_sq``, SGD momentum) are multiplied by
    ``M``. Between changes their moments stay 0 and their update is 0, so neither momentum nor
    weight decay brings a pruned weight back, and ``lit_eff.sparsity.export`` gives exact zeros.
    No per-step hook work.

    Logs ``sparsity/target`` (``s_t``) and ``sparsity/actual`` (zeros among the targeted dense
    weights, counted) on the steps Lightning writes to its loggers (``log_every_n_steps``).
    Each layer reports its density to ``FlopsMonitor``.

    Runs on: ``setup`` (targets, checks, all-ones masks attached before the strategy wraps the
    model and before a checkpoint restore), ``on_fit_start`` (resolves ``end_step``),
    ``on_train_start`` (the update due at the current step, unless the checkpoint already holds
    it), ``on_train_batch_end`` when ``trainer.global_step`` advanced (mask update if due, with
    weights and optimizer state masked; logging).

    Args:
        final_sparsity: ``s_f``, in [0, 1).
        initial_sparsity: ``s_i``, the sparsity set at ``start_step``; ``<= final_sparsity``.
        start_step: ``t0``, the first update step (optimizer steps).
        end_step: the step that reaches ``final_sparsity``; ``None`` takes 3/4 of training
            (``trainer.max_steps``, or ``trainer.estimated_stepping_batches`` when unset).
        update_every: ``Δt``, optimizer steps between updates.
        power: exponent of the schedule (3: cubic).
        scope: ``"layer"`` (each layer at ``s_t``) or ``"global"`` (one threshold across layers).
        structure: ``"unstructured"`` or ``"nm"`` (N:M at the end; see above).
        n, m: the final N:M pattern when ``structure="nm"``.
        include: name globs of the layers to prune (default: Linear layers inside ``*blocks.*``).
        exclude: name globs of layers to leave dense.

    Example::

        trainer:
          callbacks+:
            - class_path: lit_eff.callbacks.MagnitudePruning
              init_args: {final_sparsity: 0.8, start_step: 100, end_step: 1500, update_every: 100}
    """

    def __init__(
        self,
        final_sparsity: float,
        initial_sparsity: float = 0.0,
        start_step: int = 0,
        end_step: int | None = None,
        update_every: int = 100,
        power: float = 3.0,
        scope: Literal["layer", "global"] = "layer",
        structure: Literal["unstructured", "nm"] = "unstructured",
        n: int = 2,
        m: int = 4,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
    ) -> None:
        for name, value in (("final_sparsity", final_sparsity), ("initial_sparsity", initial_sparsity)):
            if not is_number(value):
                raise ValueError(f"Expected `{name}` to be a number in [0, 1), got {name}={value!r}")
            validate_sparsity(value, name)
        if initial_sparsity > final_sparsity:
            raise ValueError(f"Expected `initial_sparsity` <= `final_sparsity`, got "
                             f"initial_sparsity={initial_sparsity}, final_sparsity={final_sparsity}")
        if not is_int(start_step) or start_step < 0:
            raise ValueError(f"Expected `start_step` to be an integer >= 0, got start_step={start_step!r}")
        if end_step is not None:
            if not is_int(end_step) or end_step <= 0:
                raise ValueError(f"Expected `end_step` to be an integer > 0 or None, got end_step={end_step!r}")
            self._check_span(start_step, end_step)
        if not is_int(update_every) or update_every < 1:
            raise ValueError(f"Expected `update_every` to be an integer >= 1, got update_every={update_every!r}")
        if not is_number(power) or not power > 0:
            raise ValueError(f"Expected `power` > 0, got power={power!r}")
        check_choice("scope", scope, _SCOPES)
        check_choice("structure", structure, _STRUCTURES)
        validate_nm(n, m)
        if structure == "nm" and not math.isclose(final_sparsity, 1 - n / m, abs_tol=1e-9):
            raise ValueError(f"Expected `final_sparsity` = 1 - n/m = {1 - n / m:g} with structure='nm' (the final mask "
                             f"is exactly n:m), got final_sparsity={final_sparsity}, n={n}, m={m}")
        for name, value in (("include", include), ("exclude", exclude)):
            if value is not None and (isinstance(value, str) or not all(isinstance(p, str) for p in value)):
                raise ValueError(f"Expected `{name}` to be a list of name patterns (strings), got {name}={value!r}")
        self.final_sparsity = float(final_sparsity)
        self.initial_sparsity = float(initial_sparsity)
        self.start_step = start_step
        self.end_step = end_step
        self.update_every = update_every
        self.power = float(power)
        self.scope = scope
        self.structure = structure
        self.n, self.m = n, m
        self.include = None if include is None else list(include)
        self.exclude = None if exclude is None else list(exclude)

        self.targets: dict[str, nn.Module] = {}
        self.group: sparsity.MaskGroup | None = None
        self._end: int | None = end_step
        self._last_step = -1  # global_step whose post-step work is done
        self._last_update: int | None = None  # update step the masks were last computed for

    @staticmethod
    def _check_span(start_step: int, end_step: int, how: str = "") -> None:
        if start_step >= end_step:
            raise ValueError(f"Expected `start_step` < `end_step`, got start_step={start_step}, "
                             f"end_step={end_step}{how}")

    # schedule (a function of the optimizer step) ------------------------------------------------
    def _end_step(self) -> int:
        if self._end is None:
            raise RuntimeError("MagnitudePruning.end_step is not resolved yet: pass `end_step` or run it in a Trainer")
        return self._end

    def update_step(self, step: int) -> int | None:
        """The last update step ``<= step`` (``None`` before ``start_step``)."""
        end = self._end_step()
        if step < self.start_step:
            return None
        if step >= end:
            return end
        return self.start_step + (step - self.start_step) // self.update_every * self.update_every

    def target(self, step: int) -> float:
        """The scheduled sparsity in force at optimizer step ``step``."""
        at = self.update_step(step)
        if at is None:
            return 0.0
        if at >= self._end_step():
            return self.final_sparsity
        schedule = Polynomial(self.initial_sparsity, self.final_sparsity, self.start_step, self._end_step(),
                              self.power)
        return schedule(at)

    # setup ----------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        targets = sparsity.find_targets(pl_module, include=self.include, exclude=self.exclude)
        for name, module in targets.items():
            inputs = module.weight.shape[1]  # groups run along input features / channels
            if self.structure == "nm" and inputs % self.m:
                raise ValueError(f"Expected `m` to divide the input size of layer `{name}` (weight shape "
                                 f"{tuple(module.weight.shape)}), got m={self.m} for {inputs} inputs; "
                                 f"exclude it (exclude=[{name!r}]) or choose another `m`")
            refuse_masked(trainer, self, {name: module}, self.targets)
        for module in targets.values():
            if not sparsity.has_mask(module):
                sparsity.attach_mask(module, ste=False, density=1.0)  # dense until the first update
        self.targets = targets
        self.group = sparsity.MaskGroup(targets)
        if self._end is None and trainer.max_steps is not None and trainer.max_steps > 0:
            self._resolve_end(trainer.max_steps)

    def _resolve_end(self, total: int) -> None:
        end = int(0.75 * total)
        self._check_span(self.start_step, end, f" (3/4 of {total} training steps); set `end_step`")
        self._end = end

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._end is None:
            self._resolve_end(training_steps(trainer, "MagnitudePruning", "set `end_step` or trainer.max_steps"))

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # here, not in on_fit_start: global_step and the optimizer state are restored by now
        step = trainer.global_step
        due = self.update_step(step)
        if due is not None and due != self._last_update:
            self._update(trainer, step)
        self._last_step = step

    # masks ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _scores(self, module: nn.Module) -> torch.Tensor:
        """``|W|`` of the effective weight, pruned positions lowest, N:M-protected ones highest."""
        weight = module.parametrizations.weight.original.detach()
        mask = sparsity.get_mask(module)
        tiny = torch.finfo(weight.dtype).tiny
        scores = torch.where(mask, weight.abs().clamp_min(tiny), 0.0)  # a kept exact zero ranks above a pruned one
        if self.structure == "nm":
            scores = torch.where(sparsity.nm_mask(scores, self.n, self.m) & mask, math.inf, scores)
        return scores

    @torch.no_grad()
    def _update(self, trainer: Trainer, step: int) -> None:
        """New masks at the sparsity scheduled for ``step``, from the current weights."""
        target = self.target(step)
        scores = {name: self._scores(module) for name, module in self.targets.items()}
        if self.scope == "global":
            masks = sparsity.global_magnitude_masks(scores, target)
            densities = {name: None for name in masks}  # counted by set_mask
        else:
            masks = {name: sparsity.magnitude_mask(s, target) for name, s in scores.items()}
            densities = {name: 1.0 - round(target * s.numel()) / s.numel() for name, s in scores.items()}
        self.group.set_masks([masks[name] for name in self.targets], density=[densities[n] for n in self.targets])
        self._last_update = self.update_step(step)
        self._enforce(trainer)

    def _enforce(self, trainer: Trainer) -> None:
        """Zero the dense weights and their optimizer state at pruned positions (at the start
        and when masks change). In between nothing is needed: forward multiplies ``W`` by the
        mask, so autograd gives pruned positions an exact 0 gradient, their momentum and Adam
        moments stay 0, and the update there is 0 (weight decay of a zero weight is zero too)."""
        self.group.zero_pruned(trainer.optimizers)

    # hooks ----------------------------------------------------------------------------------
    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step <= self._last_step:
            return  # accumulating micro-batches
        if self.update_step(step) == step:
            self._update(trainer, step)
        self._last_step = step
        log_step(trainer, pl_module, lambda: {"sparsity/target": self.target(step), "sparsity/actual": self._actual()})

    @torch.no_grad()
    def _actual(self) -> float:
        """The fraction of zeros among the targeted dense weights, counted."""
        weights = [module.parametrizations.weight.original for module in self.targets.values()]
        zeros = torch.stack([(w == 0).sum() for w in weights]).sum()
        return float(zeros) / sum(w.numel() for w in weights)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # the masks stay: they are the trained state (lit_eff.sparsity.export hardens them)
        pass

    # state ----------------------------------------------------------------------------------
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(final_sparsity=self.final_sparsity, scope=self.scope,
                                        structure=self.structure, include=self.include, exclude=self.exclude)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"end_step": self._end, "last_step": self._last_step, "last_update": self._last_update}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = int(state_dict.get("last_step", -1))
        last_update = state_dict.get("last_update")
        self._last_update = None if last_update is None else int(last_update)
        if self.end_step is None and state_dict.get("end_step") is not None:
            self._end = int(state_dict["end_step"])
