"""The tensors an optimizer step updates: the dense parameter of a masked layer, and the local
shard of a parameter sharded by FSDP2 (a ``DTensor``).

Gradient masks are computed on full tensors (a top-k over a shard is not the top-k of the
layer) and applied to each rank's local shard.
"""

from __future__ import annotations

import torch
from torch import nn

from lit_eff import sparsity


def dense_weight(module: nn.Module) -> nn.Parameter:
    """``parametrizations.weight.original`` of a layer masked by :mod:`lit_eff.sparsity`, else ``weight``."""
    if sparsity.has_mask(module):
        return module.parametrizations.weight.original
    return module.weight


def is_sharded(tensor: torch.Tensor) -> bool:
    """A ``DTensor`` (FSDP2 parameter or gradient)."""
    return hasattr(tensor, "full_tensor") and hasattr(tensor, "to_local")


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every rank when sharded (a collective: every rank calls it)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def local(tensor: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's part of ``tensor``, laid out as ``like``'s local shard.

    A ``DTensor`` gives its local tensor (which aliases its storage); a full tensor beside a
    sharded ``like`` gives the slice ``like`` holds on this rank (no communication)."""
    if is_sharded(tensor):
        return tensor.to_local()
    if like is not None and is_sharded(like):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(tensor, like.device_mesh, like.placements, src_data_rank=None).to_local()
    return tensor


def sum_over_shards(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values`` summed over the ranks ``like`` is sharded across (unchanged when not sharded)."""
    if is_sharded(like):
        import torch.distributed as dist

        values = values.clone()
        dist.all_reduce(values, group=like.device_mesh.get_group())
    return values
