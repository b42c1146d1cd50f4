"""What sparsity callbacks share at ``setup``: naming a callback, refusing a weight another one masks."""

from __future__ import annotations

from collections.abc import Mapping

from lightning.pytorch import Callback, Trainer
from torch import nn

from lit_eff import sparsity


def describe_in(trainer: Trainer, callback: Callback) -> str:
    """``"NMSparsity (trainer.callbacks[1])"``: the callback's class and its place in the trainer."""
    index = next((i for i, cb in enumerate(trainer.callbacks) if cb is callback), None)
    where = f" (trainer.callbacks[{index}])" if index is not None else ""
    return f"{type(callback).__name__}{where}"


def refuse_masked(trainer: Trainer, me: Callback, targets: Mapping[str, nn.Module],
                  own: Mapping[str, nn.Module]) -> None:
    """Raise ``ValueError`` if a target already carries a mask that ``me`` did not attach.

    ``own`` is ``me``'s targets from an earlier ``setup`` (its masks are its own). The owner is
    found among ``trainer.callbacks`` by its ``targets`` attribute, and both are named.
    """
    for name, module in targets.items():
        if sparsity.has_mask(module) and own.get(name) is not module:
            owner = next((cb for cb in trainer.callbacks if cb is not me
                          and module in getattr(cb, "targets", {}).values()), None)
            by = describe_in(trainer, owner) if owner is not None else "another technique (or an earlier run)"
            raise ValueError(f"`{name}.weight` is already masked by {by}; {describe_in(trainer, me)} cannot mask "
                             f"it too: a weight takes one sparsity technique. Exclude it from one of them "
                             f"(exclude=[{name!r}])")
