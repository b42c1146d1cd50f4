"""Replace a model's feed-forward ``nn.Linear`` layers by structured ones, and back.

>>> from lit_eff.models import GPT
>>> gpt = GPT(n_layer=1, n_embd=32, n_head=2)
>>> layers = structure_linears(gpt, find_linears(gpt), "lowrank", rank=8)
>>> sorted(layers), type(gpt.blocks[0].mlp.fc1).__name__
(['blocks.0.mlp.fc1', 'blocks.0.mlp.fc2'], 'LowRankLinear')
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fnmatch import fnmatchcase

import torch
from torch import nn

from lit_eff.models.naming import named_modules
from lit_eff.structured.linear import (BlockDenseLinear, BlockShuffleLinear, LowRankLinear, StructuredLinear,
                                       to_linear)

__all__ = ["DEFAULT_FFN", "STRUCTURES", "check_shapes", "find_linears", "guide_alpha",
           "structure_linears", "structured_layers", "to_plain_linears"]

#: fc1/fc2 of the MLP in every block of a timm ViT or the kit's GPT.
DEFAULT_FFN = ("*blocks.*.mlp.fc1", "*blocks.*.mlp.fc2")
STRUCTURES = ("lowrank", "blockshuffle", "blockdense")


def find_linears(model: nn.Module, include: Sequence[str] | None = None,
                 exclude: Sequence[str] | None = None) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers whose (compile-independent) names match ``include`` (default
    :data:`DEFAULT_FFN`) and no ``exclude`` glob; raises with the existing names if none."""
    include = list(DEFAULT_FFN if include is None else include)
    exclude = list(exclude or [])
    linears = {name: m for name, m in named_modules(model) if isinstance(m, nn.Linear)}
    found = {name: m for name, m in linears.items()
             if any(fnmatchcase(name, p) for p in include) and not any(fnmatchcase(name, p) for p in exclude)}
    if not found:
        shown = ", ".join(list(linears)[:12]) + (", ..." if len(linears) > 12 else "")
        raise ValueError(f"No nn.Linear layer of {type(model).__name__} matches include={include} "
                         f"exclude={exclude}; its Linear layers: {shown or 'none'}")
    return found


def _resolve_rank(rank: int | float, linear: nn.Linear) -> int:
    """An int rank as is; a float in (0, 1) as that fraction of ``min(in, out)``."""
    if isinstance(rank, float):
        return max(1, round(rank * min(linear.in_features, linear.out_features)))
    return rank


def check_shapes(layers: dict[str, nn.Linear], structure: str, rank: int | float | None,
                 blocks: int | None) -> None:
    """Raise ``ValueError`` naming the layer when ``rank``/``blocks`` do not fit its shape."""
    for name, linear in layers.items():
        n_in, n_out = linear.in_features, linear.out_features
        if structure in ("lowrank", "blockdense"):
            r = _resolve_rank(rank, linear)
            if not 1 <= r < min(n_in, n_out) and structure == "lowrank":
                raise ValueError(f"Expected `rank` < min(in, out) = {min(n_in, n_out)} for {name} "
                                 f"({n_in} -> {n_out}), got rank={rank}")
        if structure in ("blockshuffle", "blockdense"):
            if n_in % blocks:
                raise ValueError(f"Expected `blocks` to divide the input size of {name} ({n_in}), got blocks={blocks}")
        if structure == "blockshuffle" and n_out % blocks:
            raise ValueError(f"Expected `blocks` to divide the output size of {name} ({n_out}), got blocks={blocks}")
        if structure == "blockdense" and r % blocks:
            raise ValueError(f"Expected `blocks` to divide the rank of {name} ({r}), got rank={rank}, blocks={blocks}")


def structure_linears(model: nn.Module, layers: dict[str, nn.Linear], structure: str,
                      rank: int | float | None = None, blocks: int | None = None, guided: bool = False,
                      generator_for=None) -> dict[str, StructuredLinear]:
    """Replace each of ``layers`` (``{name: nn.Linear}`` in ``model``) by its structured version
    (in place) and return ``{name: new layer}``. Low-rank layers start from the SVD of the dense
    weight; block layers from orthogonal blocks drawn from ``generator_for(name)``. With
    ``guided`` each gets a dense guide equal to its structured map and ``α = 1``."""
    check_shapes(layers, structure, rank, blocks)
    done: dict[str, StructuredLinear] = {}
    for name, linear in layers.items():
        weight = linear.weight
        gen = generator_for(name) if generator_for is not None else torch.Generator().manual_seed(0)
        bias = linear.bias is not None
        if structure == "lowrank":
            new = LowRankLinear.from_linear(linear, _resolve_rank(rank, linear))
        else:
            if structure == "blockshuffle":
                new = BlockShuffleLinear(linear.in_features, linear.out_features, blocks, bias, gen)
            else:
                new = BlockDenseLinear(linear.in_features, linear.out_features, _resolve_rank(rank, linear), blocks,
                                       bias, gen)
            if bias:
                with torch.no_grad():
                    new.bias.copy_(linear.bias)
            new = new.to(device=weight.device, dtype=weight.dtype)
        if guided:
            new.add_guide()
        _replace(model, name, new)
        done[name] = new
    return done


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    """Set the submodule called ``name`` (compile-independent name) to ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model
    if parent_name:
        parent = next(m for n, m in named_modules(model) if n == parent_name)
    setattr(parent, child, new)


def structured_layers(model: nn.Module) -> dict[str, StructuredLinear]:
    """``{name: layer}`` of the structured layers in ``model``."""
    return {name: m for name, m in named_modules(model) if isinstance(m, StructuredLinear)}


def to_plain_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Replace every structured layer of ``model`` by the ``nn.Linear`` computing the same map
    (in place; guides mixed in); returns the new layers."""
    done = {}
    for name, layer in structured_layers(model).items():
        done[name] = to_linear(layer)
        _replace(model, name, done[name])
    return done


def guide_alpha(step: int, guide_steps: int, schedule: str = "cosine") -> float:
    """``α`` of self-guided training at optimizer step ``step``: 1 at step 0, decaying to 0 at
    ``guide_steps`` (``0.5·(1 + cos(π·t/T))`` or ``1 − t/T``), 0 afterwards."""
    if step >= guide_steps:
        return 0.0
    progress = step / guide_steps
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))
