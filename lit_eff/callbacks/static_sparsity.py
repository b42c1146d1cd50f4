"""Static sparsity, optionally released: sparse pre-training, dense fine-tuning (SPDF)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from typing_extensions import override

from lit_eff import sparsity
from lit_eff.callbacks._checks import check_choice, is_int, is_number, training_steps
from lit_eff.callbacks._claims import refuse_masked
from lit_eff.callbacks._logging import log_step
from lit_eff.seeding import generator, run_seed
from lit_eff.sparsity.masks import validate_sparsity

_MASKS = ("random", "magnitude")
_DISTRIBUTIONS = ("uniform", "erk")


class StaticSparsity(Callback):
    """A fixed mask from the start; at ``release_step`` the mask goes and all weights learn (SPDF).

    **Sparse phase.** In ``setup`` every targeted layer gets one mask that never changes:
    ``mask="random"`` keeps exactly ``round(d · numel)`` positions drawn from
    ``lit_eff.seeding.generator(run_seed, "spdf-init", layer)`` (the same on every DDP rank);
    ``mask="magnitude"`` prunes the ``round((1 − d) · numel)`` smallest ``|W|`` of the weights
    the model has at that moment (its initialization, or the weights it was loaded with). The
    layer density ``d`` is ``1 − sparsity`` (``distribution="uniform"``) or its Erdős–Rényi-
    Kernel share (``"erk"``; the weight-count mean is ``1 − sparsity``). Pruned weights are
    kept exactly zero the way ``MagnitudePruning`` keeps them: forward reads ``W ⊙ M`` (plain
    masked gradient: pruned positions get exactly 0), and the dense weight and every
    optimizer-state tensor of its shape (AdamW moments, SGD momentum) are multiplied by ``M`` at
    the start of training, so moments and updates there stay 0.

    **Release** (ALGORITHMS.md §3), after the optimizer step that reaches ``release_step`` (or
    ``int(release_fraction ×`` the training steps``)``): the pruned weights are exactly zero
    with zero moments at that moment, and the mask becomes all ones. From then on every weight trains densely; the layers report density 1
    to ``FlopsMonitor`` (before: ``d``). The all-ones mask stays attached until
    ``lit_eff.sparsity.export(model)``: removing the parametrization mid-run would change the
    checkpoint keys and the optimizer's parameter order, so a checkpoint written after the
    release could not be resumed exactly. Without ``release_step``/``release_fraction`` the
    model stays sparse to the end (sparse pre-training only; fine-tune in a second run from the
    checkpoint, e.g. ``--model.init_args.init_weights path/to/last.ckpt``, see
    docs/techniques/spdf.md).

    Logs ``sparsity/target`` (``sparsity`` before the release, 0 after) and
    ``sparsity/released`` (0 or 1) on the steps Lightning writes logs.

    Runs on: ``setup`` (targets, claims, masks attached before the strategy wraps the model and
    before a checkpoint restore), ``on_fit_start`` (resolves ``release_fraction``),
    ``on_train_start`` (masking, or the release if it is due), ``on_train_batch_end`` when
    ``trainer.global_step`` advanced (release, logging).

    Args:
        sparsity: fraction of pruned weights among the targets, in [0, 1).
        mask: ``"random"`` or ``"magnitude"`` (at ``setup``).
        distribution: ``"uniform"`` or ``"erk"`` layer densities.
        release_step: optimizer step after which the mask is released; ``None``: never (unless
            ``release_fraction`` is set).
        release_fraction: release after this fraction of the training steps
            (``trainer.max_steps``, else ``trainer.estimated_stepping_batches``), in (0, 1).
        include: name globs of the layers to make sparse (default: Linear layers in ``*blocks.*``).
        exclude: name globs of layers to leave dense.

    Example::

        trainer:
          callbacks+:
            - class_path: lit_eff.callbacks.StaticSparsity
              init_args: {sparsity: 0.75, mask: random, release_fraction: 0.75}
    """

    def __init__(
        self,
        sparsity: float = 0.75,
        mask: Literal["random", "magnitude"] = "random",
        distribution: Literal["uniform", "erk"] = "uniform",
        release_step: int | None = None,
        release_fraction: float | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
    ) -> None:
        if not is_number(sparsity):
            raise ValueError(f"Expected `sparsity` to be a number in [0, 1), got sparsity={sparsity!r}")
        validate_sparsity(sparsity, "sparsity")
        check_choice("mask", mask, _MASKS)
        check_choice("distribution", distribution, _DISTRIBUTIONS)
        if release_step is not None and (not is_int(release_step) or release_step < 1):
            raise ValueError(f"Expected `release_step` to be an integer >= 1 or None, got release_step={release_step!r}")
        if release_fraction is not None and (not is_number(release_fraction) or not 0.0 < release_fraction < 1.0):
            raise ValueError(f"Expected `release_fraction` in (0, 1) or None, got release_fraction={release_fraction!r}")
        if release_step is not None and release_fraction is not None:
            raise ValueError(f"Expected at most one of `release_step` and `release_fraction`, got "
                             f"release_step={release_step}, release_fraction={release_fraction}")
        for name, value in (("include", include), ("exclude", exclude)):
            if value is not None and (isinstance(value, str) or not all(isinstance(p, str) for p in value)):
                raise ValueError(f"Expected `{name}` to be a list of name patterns (strings), got {name}={value!r}")
        self.sparsity = float(sparsity)
        self.mask = mask
        self.distribution = distribution
        self.release_step = release_step
        self.release_fraction = None if release_fraction is None else float(release_fraction)
        self.include = None if include is None else list(include)
        self.exclude = None if exclude is None else list(exclude)

        self.targets: dict[str, nn.Module] = {}
        self.group: sparsity.MaskGroup | None = None
        self.densities: dict[str, float] = {}
        self._release: int | None = release_step  # resolved release step
        self.released = False
        self._released_at: int | None = None
        self._last_step = -1  # global_step whose post-step work is done

    # setup ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _initial_mask(self, name: str, weight: torch.Tensor, density: float) -> torch.Tensor:
        if self.mask == "random":
            return sparsity.random_mask(weight.shape, density, generator(run_seed(), "spdf-init", name)).to(weight.device)
        return sparsity.magnitude_mask(weight, 1.0 - density)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        targets = sparsity.find_targets(pl_module, include=self.include, exclude=self.exclude)
        refuse_masked(trainer, self, targets, self.targets)
        shapes = {name: tuple(module.weight.shape) for name, module in targets.items()}
        spread = sparsity.erk_densities if self.distribution == "erk" else sparsity.uniform_densities
        densities = spread(shapes, 1.0 - self.sparsity)
        for name, module in targets.items():
            if sparsity.has_mask(module):  # ours, from an earlier setup
                continue
            weight = module.weight
            mask = self._initial_mask(name, weight, densities[name])
            with torch.no_grad():
                weight.mul_(mask)
            sparsity.attach_mask(module, mask=mask, ste=False, density=int(mask.sum()) / mask.numel())
        self.targets = targets
        self.group = sparsity.MaskGroup(targets)
        self.densities = densities
        if self._release is None and self.release_fraction is not None and trainer.max_steps and trainer.max_steps > 0:
            self._release = max(1, int(self.release_fraction * trainer.max_steps))

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._release is None and self.release_fraction is not None:
            total = training_steps(trainer, "StaticSparsity", "set `release_step` or trainer.max_steps")
            self._release = max(1, int(self.release_fraction * total))

    @property
    def resolved_release_step(self) -> int | None:
        """The optimizer step after which the mask is released (``None``: never)."""
        return self._release

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # here, not in on_fit_start: global_step and the optimizer state are restored by now
        step = trainer.global_step
        if not self.released:
            self._enforce(trainer)
            if self._due(step):
                self._release_masks(step)
        self._last_step = step

    # masks ----------------------------------------------------------------------------------
    def _due(self, step: int) -> bool:
        return self._release is not None and step >= self._release

    def _enforce(self, trainer: Trainer) -> None:
        """Zero the dense weights and their optimizer state at pruned positions (at the start
        and when masks change). In between nothing is needed: forward multiplies ``W`` by the
        mask, so autograd gives pruned positions an exact 0 gradient, their momentum and Adam
        moments stay 0, and the update there is 0 (weight decay of a zero weight is zero too)."""
        self.group.zero_pruned(trainer.optimizers)

    @torch.no_grad()
    def _release_masks(self, step: int) -> None:
        for module in self.targets.values():
            sparsity.set_mask(module, torch.ones_like(sparsity.get_mask(module)), density=1.0)
        self.released = True
        self._released_at = step

    # hooks ----------------------------------------------------------------------------------
    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step <= self._last_step:
            return  # accumulating micro-batches
        if not self.released and self._due(step):
            self._release_masks(step)
        self._last_step = step
        log_step(trainer, pl_module, {"sparsity/target": 0.0 if self.released else self.sparsity,
                                      "sparsity/released": float(self.released)})

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # the masks stay (released ones are all ones): lit_eff.sparsity.export hardens them
        pass

    # state ----------------------------------------------------------------------------------
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(sparsity=self.sparsity, mask=self.mask, distribution=self.distribution,
                                        include=self.include, exclude=self.exclude)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"release_step": self._release, "released": self.released, "released_at": self._released_at,
                "last_step": self._last_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.release_step is None and state_dict.get("release_step") is not None:
            self._release = int(state_dict["release_step"])
        self.released = bool(state_dict.get("released", False))
        released_at = state_dict.get("released_at")
        self._released_at = None if released_at is None else int(released_at)
        self._last_step = int(state_dict.get("last_step", -1))
