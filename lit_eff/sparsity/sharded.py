"""Masks beside FSDP2-sharded parameters.

Under FSDP2 (``fully_shard``) a parameter, its gradient and its optimizer state are ``DTensor``
shards, while a mask buffer stays a full tensor on every rank. Masks are computed from full
weights (:func:`full`, an all-gather, so N:M groups and top-k are exact and the same on every
rank) and applied to each rank's own shard (:func:`local`, :func:`local_part`).
"""

from __future__ import annotations

import torch

try:  # torch built without distributed support has no DTensor
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover
    DTensor, distribute_tensor = None, None

__all__ = ["full", "is_sharded", "local", "local_part"]


def is_sharded(tensor: object) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (gathered from every rank if sharded: all ranks must call it)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor (in-place edits reach it), else the tensor."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def local_part(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The part of ``whole`` (a full tensor of ``like``'s shape) that this rank's shard of ``like``
    holds; ``whole`` itself when ``like`` is not sharded. No communication."""
    if not is_sharded(like):
        return whole
    return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None).to_local()


def as_sharded_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``whole`` as a DTensor laid out like ``like`` (for arithmetic with a sharded tensor)."""
    if not is_sharded(like):
        return whole
    return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None)
