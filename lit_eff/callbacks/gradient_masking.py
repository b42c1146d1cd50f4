"""SparCL's dynamic gradient masking (DGM): update only the largest-gradient weights."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from typing_extensions import override

from lit_eff import sparsity
from lit_eff.callbacks._checks import is_int
from lit_eff.callbacks._logging import log_step, logs_this_step
from lit_eff.gradients.topk import topk_mask, validate_density
from lit_eff.schedules import Schedule

_SHARDED = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


def dense_weight(module: nn.Module) -> nn.Parameter:
    """The parameter the optimizer updates: ``parametrizations.weight.original`` when the
    module is masked (:mod:`lit_eff.sparsity`), else ``weight``."""
    if sparsity.has_mask(module):
        return module.parametrizations.weight.original
    return module.weight


def refuse_sharded(trainer: Trainer, who: str, why: str) -> None:
    """``ValueError`` under FSDP/DeepSpeed/model-parallel strategies (flat, sharded parameters)."""
    name = type(trainer.strategy).__name__
    if name in _SHARDED:
        raise ValueError(f"{who} does not support {name}: {why}. Use DDP (strategy='ddp') or a single device")


class GradientMasking(Callback):
    """Keeps only the largest gradient entries of each targeted layer (SparCL DGM, ALGORITHMS.md §2).

    Every ``refresh_every`` optimizer steps (``global_step % refresh_every == 0``), per layer,
    the ``density`` fraction of largest ``|g|`` entries among the *allowed* ones is stored as
    the layer's gradient pattern: ``k = round(density · allowed)`` entries (at least 1), where
    *allowed* is the layer's sparsity mask if a sparsity callback (NMSparsity,
    MagnitudePruning, DynamicSparsity) masks it, else every entry. On every optimizer step the
    gradient is multiplied by ``pattern ∧ current sparsity mask``. ``g`` is the gradient the
    optimizer would use: accumulated over ``accumulate_grad_batches``, all-reduced by DDP and
    unscaled by AMP (Lightning unscales before ``on_before_optimizer_step``), before gradient
    clipping (so clipping sees the masked gradient). SparCL takes its percentile over all
    entries of a masked layer; here ``density`` is a fraction of the allowed entries.

    **Masked entries do not move**, whatever the optimizer: AdamW's momentum and weight decay
    would move an entry with a zero gradient, so the values of the targeted weights are copied
    before each optimizer step and the entries outside the pattern are put back right after it
    (an optimizer step post-hook, before any ``on_train_batch_end``). Between refreshes only
    pattern entries change. The optimizer state of a masked entry still evolves as if its
    gradient were 0 (Adam moments decay); it is not reset. Cost: one copy of the targeted
    weights per step (fused ``torch._foreach`` copy and exact ``lerp`` restore), and that
    much extra memory.

    ``density`` may be a :class:`lit_eff.schedules.Schedule` of the optimizer step, read at each
    refresh. Only weights are masked (biases and norms are left alone). Patterns live in this
    callback's ``state_dict`` (checkpointed), so a resumed run masks exactly as an
    uninterrupted one. Every rank holds the same all-reduced gradient, so DDP ranks compute the
    same pattern. Not supported under FSDP/DeepSpeed (sharded flat parameters).

    Logs ``grad_mask/density`` (the density of the pattern in force) and
    ``grad_mask/kept_norm_fraction`` (``‖g ⊙ keep‖ / ‖g ⊙ allowed‖`` over all targeted layers,
    computed only then) on the steps Lightning writes to its loggers (``log_every_n_steps``).

    Args:
        density: fraction of gradient entries kept, in (0, 1], or a Schedule of the step.
        refresh_every: optimizer steps between pattern refreshes (SparCL: 30), >= 1.
        include: name globs of layers to mask (default: Linear layers inside ``*blocks.*``).
        exclude: name globs of layers to leave alone.

    Example::

        trainer:
          callbacks+:
            - class_path: lit_eff.callbacks.GradientMasking
              init_args: {density: 0.2, refresh_every: 30}
    """

    def __init__(
        self,
        density: float | Schedule = 0.2,
        refresh_every: int = 30,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
    ) -> None:
        if isinstance(density, Schedule):
            validate_density(density(0), "density")  # the value at step 0; each refresh checks its own
        else:
            validate_density(density, "density")
        if not is_int(refresh_every) or refresh_every < 1:
            raise ValueError(f"Expected `refresh_every` to be an integer >= 1, got refresh_every={refresh_every!r}")
        for name, value in (("include", include), ("exclude", exclude)):
            if value is not None and (isinstance(value, str) or not all(isinstance(p, str) for p in value)):
                raise ValueError(f"Expected `{name}` to be a list of name patterns (strings), got {name}={value!r}")
        self.density = density
        self.refresh_every = refresh_every
        self.include = None if include is None else list(include)
        self.exclude = None if exclude is None else list(exclude)

        # not called `targets`: that attribute names a sparsity callback's masked layers (_claims.py)
        self.layers: dict[str, nn.Module] = {}
        self.patterns: dict[str, torch.Tensor] = {}
        self._density: float | None = None  # density of the patterns in force
        self._refreshed_at: int | None = None
        self._saved: dict[int, tuple[list, list, list]] = {}  # per optimizer: weights, copies, drop masks
        self._hooks: list[Any] = []
        self._plans: dict[int, list[tuple[str, nn.Module, nn.Parameter]]] = {}
        self._buffers: dict[int, torch.Tensor] = {}
        self._keeps: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # unmasked layers: pattern, 1 - pattern (float)
        self._fraction: torch.Tensor | None = None
        self._fraction_step = -1
        self._last_step = -1

    def density_at(self, step: int) -> float:
        """The density a refresh at optimizer step ``step`` uses."""
        if isinstance(self.density, Schedule):
            return validate_density(self.density(step), f"density (at step {step})")
        return float(self.density)

    # setup ----------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        refuse_sharded(trainer, "GradientMasking", "it masks each layer's full gradient")
        self.layers = sparsity.find_targets(pl_module, include=self.include, exclude=self.exclude)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove_hooks()
        for optimizer in trainer.optimizers:
            self._hooks.append(optimizer.register_step_post_hook(self._restore))

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove_hooks()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._saved, self._plans, self._buffers = {}, {}, {}

    # masking --------------------------------------------------------------------------------
    @staticmethod
    def allowed(module: nn.Module) -> torch.Tensor | None:
        """The layer's sparsity mask (kept weights), or ``None`` when it is not masked."""
        return sparsity.get_mask(module) if sparsity.has_mask(module) else None

    def _due(self, step: int) -> bool:
        return step % self.refresh_every == 0 or self._refreshed_at is None

    @torch.no_grad()
    def refresh(self, step: int) -> None:
        """New patterns from the current gradients, at the density scheduled for ``step``."""
        density = self.density_at(step)
        for name, module in self.layers.items():
            grad = dense_weight(module).grad
            if grad is not None:
                self.patterns[name] = topk_mask(grad, density, self.allowed(module))
        self._keeps = {}
        self._density = density
        self._refreshed_at = step

    def _layers_of(self, optimizer: torch.optim.Optimizer) -> list[tuple[str, nn.Module, nn.Parameter]]:
        """The targeted layers whose weight ``optimizer`` updates (cached per optimizer)."""
        key = id(optimizer)
        if key not in self._plans:
            mine = {id(p) for group in optimizer.param_groups for p in group["params"]}
            self._plans[key] = [(name, module, dense_weight(module)) for name, module in self.layers.items()
                                if id(dense_weight(module)) in mine]
        return self._plans[key]

    @override
    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        step = trainer.global_step
        if self._due(step):
            self.refresh(step)
        # the step metrics of this step reach the loggers (same test as at on_train_batch_end: Lightning
        # counts the step as done only after it), or this is the last step
        measure = logs_this_step(trainer) or 0 < (trainer.max_steps or 0) <= step + 1
        weights, grads, keeps, drops, among_allowed = [], [], [], [], []
        for name, module, weight in self._layers_of(optimizer):
            grad = weight.grad
            if grad is None:
                continue  # frozen (LayerFreezing)
            if name not in self.patterns:  # no gradient at the last refresh: its pattern starts now
                self.patterns[name] = topk_mask(grad, self._density, self.allowed(module))
            pattern = self.patterns[name]
            if pattern.device != weight.device:
                pattern = self.patterns[name] = pattern.to(weight.device)
            allowed = self.allowed(module)
            if allowed is None:
                cached = self._keeps.get(name)
                if cached is None or cached[0].dtype != weight.dtype or cached[0].device != weight.device:
                    keep = pattern.to(weight.dtype)
                    cached = self._keeps[name] = (keep, 1 - keep)
                keep, drop = cached
            else:
                keep = (pattern & allowed).to(weight.dtype)
                drop = 1 - keep
                if measure:
                    among_allowed.append((len(grads), grad.mul(allowed).norm()))
            weights.append(weight)
            grads.append(grad)
            keeps.append(keep)
            drops.append(drop)
        if not grads:
            return
        if measure:  # only on the steps a logger writes: two norms per layer
            before = torch.stack(torch._foreach_norm(grads))
            for index, norm in among_allowed:
                before[index] = norm
        torch._foreach_mul_(grads, keeps)
        if measure:
            after = torch.stack(torch._foreach_norm(grads))
            total = before.square().sum().sqrt()
            self._fraction = torch.where(total > 0, after.square().sum().sqrt() / total, torch.ones_like(total))
            self._fraction_step = step
        saved = self._copies(weights)
        torch._foreach_copy_(saved, [w.detach() for w in weights])
        self._saved[id(optimizer)] = (weights, saved, drops)

    def _copies(self, weights: list[nn.Parameter]) -> list[torch.Tensor]:
        """Reused buffers for the pre-step weights (one per weight, allocated once)."""
        copies = []
        for weight in weights:
            buffer = self._buffers.get(id(weight))
            if buffer is None or buffer.shape != weight.shape or buffer.dtype != weight.dtype \
                    or buffer.device != weight.device:
                buffer = self._buffers[id(weight)] = torch.empty_like(weight, requires_grad=False)
            copies.append(buffer)
        return copies

    @torch.no_grad()
    def _restore(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Optimizer step post-hook: entries outside the pattern get their pre-step values back.

        ``lerp(w, before, t)`` with ``t`` 0 (kept) or 1 (dropped) is exact at both ends: PyTorch
        computes ``w + t·(before − w)`` for ``t < 0.5`` and ``before − (before − w)·(1 − t)`` else."""
        weights, saved, drops = self._saved.pop(id(optimizer), ((), (), ()))
        if weights:
            torch._foreach_lerp_([w.detach() for w in weights], saved, drops)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step <= self._last_step or self._density is None:
            return  # accumulating micro-batches
        self._last_step = trainer.global_step

        def values() -> dict[str, Any]:
            out: dict[str, Any] = {"grad_mask/density": self._density}
            if self._fraction is not None and self._fraction_step == trainer.global_step - 1:
                out["grad_mask/kept_norm_fraction"] = self._fraction
            return out

        log_step(trainer, pl_module, values)

    # state ----------------------------------------------------------------------------------
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(refresh_every=self.refresh_every, include=self.include,
                                        exclude=self.exclude)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"patterns": {name: p.cpu() for name, p in self.patterns.items()}, "density": self._density,
                "refreshed_at": self._refreshed_at}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.patterns = {name: p.bool() for name, p in state_dict.get("patterns", {}).items()}
        self._keeps = {}
        self._density = state_dict.get("density")
        self._refreshed_at = state_dict.get("refreshed_at")
