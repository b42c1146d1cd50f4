"""The base of the weight-sparsity callbacks.

Other techniques see a sparsity callback only through ``targets`` (``{name: module}`` of the
layers whose ``weight`` it masks, names without compile wrappers, filled at ``setup``) and
:meth:`MaskingTechnique.mask_changes_after`. A subclass adds its schedule and mask rule; the base
calls them from these hooks:

- ``setup``: targets by ``layers`` and ``include``/``exclude`` globs (a weight another
  :class:`MaskingTechnique` masks is refused); all-ones masks are attached before the strategy wraps
  or shards the model and before a checkpoint loads. That is all in ``validate``/``test``/``predict``.
- ``on_fit_start``: :meth:`~MaskingTechnique.resolve` fixes the schedule for the run length.
- ``on_train_start`` (weights, optimizer and step restored): :meth:`~MaskingTechnique.start`.
- once per optimizer step (``on_train_batch_end``): :meth:`~MaskingTechnique.after_step`; after a
  mask change and on logging steps, a fused check that the masked weights are finite
  (``on_nonfinite``), read one step later so it never waits on the device.
- ``teardown`` of ``fit`` in a ``ddp_spawn`` worker: masks are hardened into plain weights.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from lit_eff import sparsity, validation
from lit_eff.callbacks.technique import Technique, logs_this_step
from lit_eff.seeding import generator, run_seed
from lit_eff.sparsity.sharded import is_sharded

__all__ = ["MaskingTechnique"]

_NONFINITE = ("raise", "warn")


class MaskingTechnique(Technique):
    """Base of the callbacks that mask weights with :mod:`lit_eff.sparsity`.

    Args (every subclass takes them):
        include: name globs of the layers to mask (default: layers inside ``*blocks.*``).
        exclude: name globs of layers to leave dense.
        layers: kinds of layers to mask: ``["linear"]`` (default), ``["conv"]`` or both.
        on_nonfinite: ``"raise"`` (default) stops training when a masked layer's weights hold a
            NaN or inf, naming the layer and the step; ``"warn"`` warns once per layer and goes on.
    """

    ste: bool = True  # gradient to pruned weights: straight-through (True) or masked (False)
    _key_fields: tuple[str, ...] = ()  # constructor arguments that tell two instances apart

    def __init__(self, include: list[str] | None = None, exclude: list[str] | None = None,
                 layers: list[Literal["linear", "conv"]] | None = None,
                 on_nonfinite: Literal["raise", "warn"] = "raise") -> None:
        super().__init__()
        self.include = validation.check_patterns("include", include)
        self.exclude = validation.check_patterns("exclude", exclude)
        self.layers = validation.check_patterns("layers", layers)
        for kind in self.layers or ():
            validation.check_choice("layers", kind, list(sparsity.LAYER_KINDS))
        validation.check_choice("on_nonfinite", on_nonfinite, _NONFINITE)
        self.on_nonfinite = on_nonfinite
        self.targets: dict[str, nn.Module] = {}
        self.group: sparsity.MaskGroup | None = None
        self._drawn = False  # draw() set the initial masks (subclasses keep the flag in their checkpoint state)
        self._pending: tuple[int, torch.Tensor] | None = None  # a step's finite flag, read one step later
        self._checked = -1  # the MaskGroup version last checked
        self._warned: set[str] = set()

    # the interface -----------------------------------------------------------------------------
    def mask_changes_after(self, step: int, total_steps: int) -> str | None:
        """``None`` if the masks and β forward uses at optimizer step ``step`` stay in force for the rest
        of a ``total_steps`` run (weight-derived masks like N:M count as unchanged while the weights are);
        otherwise why not, e.g. ``"it updates masks until step 900"``. Valid from ``on_fit_start`` on."""
        raise NotImplementedError

    # what subclasses add -----------------------------------------------------------------------
    def check_targets(self, targets: dict[str, nn.Module]) -> None:
        """Raise if a target cannot take this technique's masks (e.g. an N:M group size)."""

    def attached(self) -> None:
        """Setup attached fresh all-ones masks (a new model, not a resumed one yet)."""

    def resolve(self, trainer: Trainer) -> None:
        """Fix the schedule for this run (``self.run_length``) and check it over the whole run."""

    def start(self, trainer: Trainer) -> None:
        """Masks for ``trainer.global_step`` at the start of training (or of a resumed run)."""

    def after_step(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        """Work after the optimizer step that reached ``step`` (once per optimizer step)."""

    def plan_densities(self, step: int, total: int) -> dict[str, float] | None:
        """Each target's density at ``step`` of a ``total``-step run, for FLOPs budgets (``None``: unknown)."""
        return None

    # shared work -------------------------------------------------------------------------------
    def enforce(self, trainer: Trainer) -> None:
        """Zero the dense weights and their optimizer state at pruned positions (at the start and when
        masks change; with ``ste=False`` pruned positions then get exact 0 gradients, moments and updates)."""
        self.group.zero_pruned(trainer.optimizers)

    @torch.no_grad()
    def draw(self, densities: dict[str, float], tag: str, magnitude: bool = False) -> None:
        """Initial masks keeping ``round(density · size)`` weights of each target: at random, the same on
        every rank (``tag`` keys the seed), or the largest ``|W|`` (``magnitude``)."""
        names, params = self.group.names, self.group.params
        if magnitude:
            masks = [sparsity.magnitude_mask(w, 1.0 - densities[n]) for n, w in zip(names, self.group.full_weights())]
        else:
            masks = [sparsity.random_mask(p.mask.shape, densities[n], generator(run_seed(), tag, n))
                     for n, p in zip(names, params)]
        sizes = [p.mask.numel() for p in params]
        self.group.set_masks([mask.to(p.mask.device) for mask, p in zip(masks, params)],
                             density=[round(densities[n] * size) / size for n, size in zip(names, sizes)])
        self._drawn = True

    @staticmethod
    def check_group_sizes(targets: dict[str, nn.Module], sizes: dict[int, str]) -> None:
        """Raise unless each N:M group size (``{m: note}``) divides every target's input size."""
        for name, module in targets.items():
            inputs = module.weight.shape[1]  # groups run along input features / channels
            for m, note in sorted(sizes.items()):
                if inputs % m:
                    raise ValueError(f"Expected `m` to divide the input size of layer `{name}` (weight shape "
                                     f"{tuple(module.weight.shape)}), got m={m}{note} for {inputs} inputs; "
                                     f"exclude it (exclude=[{name!r}]) or choose another `m`")

    def known_length(self, trainer: Trainer) -> int | None:
        """The run's optimizer steps, or ``None`` when the trainer cannot tell."""
        try:
            return self.run_length(trainer)
        except ValueError:
            return None

    # hooks ---------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        targets = sparsity.find_targets(pl_module, include=self.include, exclude=self.exclude,
                                        kinds=self.layers or ("linear",))
        self.check_targets(targets)
        owners = self.others(trainer, MaskingTechnique)
        for name, module in targets.items():
            if sparsity.has_mask(module) and self.targets.get(name) is not module:
                owner = next((cb for cb in owners if any(m is module for m in cb.targets.values())), None)
                by = owner.describe(trainer) if owner is not None else "another technique (or an earlier run)"
                raise ValueError(f"`{name}.weight` is already masked by {by}; {self.describe(trainer)} cannot mask "
                                 f"it too: a weight takes one sparsity technique. Exclude it from one of them "
                                 f"(exclude=[{name!r}])")
        fresh = [module for module in targets.values() if not sparsity.has_mask(module)]
        for module in fresh:
            sparsity.attach_mask(module, ste=self.ste, density=1.0)  # all ones until the fit starts
        self.targets, self.group = targets, sparsity.MaskGroup(targets)
        if fresh:
            self.attached()

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.resolve(trainer)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # here, not in on_fit_start: the step, weights and optimizer state are restored by now
        self.start(trainer)
        self.mark_step(trainer.global_step)
        self._pending = None

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.optimizer_stepped(trainer):
            return  # accumulating micro-batches
        step = trainer.global_step
        self.after_step(trainer, pl_module, step)
        pending, self._pending = self._pending, None
        if pending is not None:  # read one step later: no wait on the device
            self._nonfinite(*pending)
        flag = self.finite_flag(trainer)
        if flag is not None:
            self._pending = (step, flag)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            self._nonfinite(*pending)
        self._nonfinite(trainer.global_step, self._finite_now())  # nothing non-finite leaves unreported

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # The masks stay on the model (lit_eff.sparsity.export hardens them). A ddp_spawn worker hands the
        # main process only the state dict, which its model without masks would load partly: harden them.
        if stage == "fit" and self.in_worker_process():
            for module in self.targets.values():
                if sparsity.has_mask(module):
                    sparsity.remove_mask(module, harden=True)
            self.group = None

    def finite_flag(self, trainer: Trainer) -> torch.Tensor | None:
        """Whether each target's weights are all finite now, read one step later (``None``: not checked):
        checked after every mask change (every step for N:M) and on the steps Lightning logs."""
        if self.group.version == self._checked and not logs_this_step(trainer):
            return None
        self._checked = self.group.version
        return self._finite_now()

    def _finite_now(self) -> torch.Tensor:
        return self._on_all_ranks(self.group.finite())

    def _on_all_ranks(self, flags: torch.Tensor) -> torch.Tensor:
        """Under FSDP2 each rank checks its own shards: a layer is finite only if it is on every rank."""
        if not any(is_sharded(w) for w in self.group.weights):
            return flags
        values = flags.to(torch.int32)
        dist.all_reduce(values, op=dist.ReduceOp.MIN)
        return values.bool()

    def _nonfinite(self, step: int, flags: torch.Tensor) -> None:
        flagged = [i for i, ok in enumerate(flags.tolist()) if not ok]
        if not flagged:
            return
        exact = self._on_all_ranks(torch.tensor([self.group.all_finite(i) for i in flagged]))  # fast check can overflow
        bad = [self.group.names[i] for i, ok in zip(flagged, exact.tolist()) if not ok]
        if not bad or (self.on_nonfinite == "warn" and self._warned.issuperset(bad)):
            return
        message = (f"{self.name}: the weights of {', '.join(f'`{n}`' for n in bad)} hold NaN or inf after "
                   f"optimizer step {step} (a non-finite loss or gradient reached them). Lower the learning "
                   f"rate or clip gradients; on_nonfinite='warn' keeps training")
        if self.on_nonfinite == "raise":
            raise FloatingPointError(message)
        self._warned.update(bad)
        rank_zero_warn(message)

    # state ---------------------------------------------------------------------------------------
    @property
    @override
    def state_key(self) -> str:
        # two instances on different layers of one model keep separate checkpoint entries
        return self._generate_state_key(**{f: getattr(self, f) for f in self._key_fields}, include=self.include,
                                        exclude=self.exclude)
