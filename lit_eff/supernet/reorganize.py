"""Sort each block's "middle" units by importance, so the first units (the ones every smaller
subnet keeps) are the most important ones: OFA's ``re_organize_middle_weights``, which DεpS runs
once when it starts shrinking (``DelayedShrinking(reorganize=True)``).

Per block of an elastic ViT/GPT:

- MLP hidden units: importance of unit ``j`` = ``sum_i |fc2.weight[i, j]|`` (the L1 norm of the
  weights that read it, as in OFA); ``fc1`` rows and bias and ``fc2`` columns are permuted.
- Attention heads: importance of head ``h`` = the L1 norm of its ``proj`` columns; the head's
  rows of q, k and v in ``qkv`` and its ``proj`` columns move together.

Units are sorted by descending importance (stable). The full model computes exactly the same
function afterwards (up to float summation order); only which units the slices keep changes.
The optimizer's per-parameter state (AdamW moments, SGD momentum) is permuted with the weights,
so the next step is the step the unpermuted model would have taken, permuted. Sharded
parameters and states (FSDP2's DTensors) are gathered, permuted and written back to each
rank's shard, so the result is exactly the unsharded one (every rank must call this together).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


def _full(t: torch.Tensor) -> torch.Tensor:
    """``t``, gathered first if it is a sharded DTensor (a collective)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _permute(param: nn.Parameter, index: torch.Tensor, dim: int, optimizer: torch.optim.Optimizer | None) -> None:
    tensors = [param.data]
    if optimizer is not None:
        tensors += [t for t in optimizer.state.get(param, {}).values()
                    if torch.is_tensor(t) and t.shape == param.shape]
    for t in tensors:
        permuted = _full(t).index_select(dim, index.to(t.device))
        if isinstance(t, DTensor):  # write back this rank's shard of the permuted tensor
            t.to_local().copy_(distribute_tensor(permuted, t.device_mesh, t.placements).to_local())
        else:
            t.copy_(permuted)


def unit_order(importance: torch.Tensor) -> torch.Tensor:
    """Indices that sort ``importance`` descending; ties keep their current order."""
    return torch.sort(importance, descending=True, stable=True).indices


@torch.no_grad()
def reorganize_middle_weights(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Sort every block's MLP hidden units and attention heads of ``model`` (an ``ElasticViT`` or
    ``ElasticGPT``) by importance, in place, permuting ``optimizer``'s state along."""
    for block in model.blocks:
        fc1, fc2 = block.mlp.fc1, block.mlp.fc2
        order = unit_order(_full(fc2.weight.data).abs().sum(0))
        _permute(fc1.weight, order, 0, optimizer)
        _permute(fc1.bias, order, 0, optimizer)
        _permute(fc2.weight, order, 1, optimizer)

        qkv, proj, heads, hd = block.attn.qkv, block.attn.proj, block.max_heads, block.head_dim
        proj_w = _full(proj.weight.data)
        head_order = unit_order(proj_w.abs().reshape(proj_w.shape[0], heads, hd).sum((0, 2)))
        cols = (head_order[:, None] * hd + torch.arange(hd, device=head_order.device)).reshape(-1)
        inner = heads * hd
        rows = torch.cat([cols + i * inner for i in range(3)])  # the same heads in q, k and v
        _permute(proj.weight, cols, 1, optimizer)
        _permute(qkv.weight, rows, 0, optimizer)
        _permute(qkv.bias, rows, 0, optimizer)
