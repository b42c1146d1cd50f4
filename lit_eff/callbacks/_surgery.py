"""Lightning glue for techniques that change a model's parameters in the middle of a fit
(structures removed, layers replaced), shared by StructuredFFN and StructuredPruning.

- :func:`refuse_strategy`: only a single device and DDP can follow such changes.
- :func:`rebuild_training`: after the change, wrap the model in DDP again, re-create the
  optimizers and schedulers from ``configure_optimizers`` at the same step, and carry every
  surviving parameter's optimizer state (sliced the way the parameter was sliced).
- :func:`restructure_on_load`: a ``load_state_dict`` pre-hook that lets a fresh model take a
  checkpoint written after such a change (resume), before Lightning loads the weights and
  builds the optimizers.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch import nn

__all__ = ["Carried", "refuse_strategy", "rebuild_training", "restructure_on_load"]

Carried = dict[nn.Parameter, tuple[nn.Parameter, list[tuple[int, torch.Tensor]]]]


def refuse_strategy(trainer: Trainer, who: str, what: str) -> None:
    """Raise unless the strategy is a single device or DDP (incl. ``ddp_spawn``)."""
    strategy = trainer.strategy
    if isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        return
    raise ValueError(
        f"{who} {what}, which changes parameter shapes during training; {type(strategy).__name__} fixes how "
        f"parameters are sharded or wrapped when the model is set up and cannot follow. Use a single device or "
        f"DDP (strategy='ddp' or 'ddp_spawn')")


def _origin(param: nn.Parameter, carried: Carried, state: dict) -> tuple[nn.Parameter | None, list]:
    """The old parameter ``param`` was cut from (following chains of cuts), and the cuts in order."""
    cuts: list = []
    while param not in state and param in carried:
        param, first = carried[param]
        cuts = first + cuts
    return (param, cuts) if param in state else (None, [])


def _carry(old: torch.optim.Optimizer, new: torch.optim.Optimizer, carried: Carried) -> None:
    for old_group, new_group in zip(old.param_groups, new.param_groups):
        for key in ("lr", "initial_lr"):
            if key in old_group:
                new_group[key] = old_group[key]
    for group in new.param_groups:
        for param in group["params"]:
            source, cuts = _origin(param, carried, old.state)
            if source is None:
                continue
            entry = {}
            for key, value in old.state[source].items():
                if isinstance(value, torch.Tensor) and value.shape == source.shape and value.dim() > 0:
                    for dim, index in cuts:
                        value = value.index_select(dim, index.to(value.device))
                    value = value.clone()
                elif isinstance(value, torch.Tensor):
                    value = value.clone()
                entry[key] = value
            new.state[param] = entry


def rebuild_training(trainer: Trainer, carried: Carried) -> None:
    """The LightningModule's parameters changed (``carried`` maps each new parameter cut from an
    old one to its origin): wrap it in DDP again, create optimizers and schedulers anew from
    ``configure_optimizers``, give them the old ones' learning rates and schedule positions, and
    carry optimizer state. Parameters that left the model lose theirs."""
    strategy = trainer.strategy
    old_optimizers = list(trainer.optimizers)
    old_schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
    if isinstance(strategy, DDPStrategy) and trainer.world_size > 1 and strategy.model is not strategy.lightning_module:
        old = strategy.model
        # the old reducer's gradient hooks sit on parameters that stay in the model: remove them
        # now rather than when the old wrapper is garbage-collected
        remove_hooks = getattr(old, "_remove_autograd_hooks", None)
        if callable(remove_hooks):
            remove_hooks()
        strategy.model = strategy.lightning_module
        strategy.configure_ddp()
        del old
        gc.collect()
    strategy.setup_optimizers(trainer)
    for old, new in zip(old_optimizers, trainer.optimizers):
        _carry(old, new, carried)
    for old, config in zip(old_schedulers, trainer.lr_scheduler_configs):
        config.scheduler.load_state_dict(old.state_dict())
    for old, new in zip(old_optimizers, trainer.optimizers):  # the schedulers' load must not change them
        for old_group, new_group in zip(old.param_groups, new.param_groups):
            new_group["lr"] = old_group["lr"]


def restructure_on_load(pl_module: LightningModule, fix: Callable[[dict[str, Any], dict[nn.Module, str]], None]):
    """Register a pre-hook on ``pl_module.load_state_dict`` that first calls ``fix(state_dict,
    names)`` (``names``: module -> its key prefix in ``state_dict``) so the model takes the
    checkpoint's shapes; returns the handle."""

    def hook(module, state_dict, prefix, *args) -> None:
        # keys are the module's own names here (the kit's compile-agnostic pre-hook ran first)
        fix(state_dict, {m: prefix + (name + "." if name else "") for name, m in module.named_modules()})

    return pl_module.register_load_state_dict_pre_hook(hook)
