"""Choosing and moving tokens: importance scores, top-k indices in original order, gather/scatter.

All functions work on whole batches (no per-sample Python loops) and move tokens with
``gather``/``scatter``, so later layers really run on fewer tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SCORES", "cls_attention", "gather_tokens", "scatter_tokens", "score_tokens", "selected_first",
           "topk_sorted", "with_prefix"]

SCORES = ("attn", "cosine", "norm", "random")


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, i]]`` for ``x`` of shape ``[B, N, C]`` and ``index`` of shape ``[B, K]``."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_tokens(x: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` with ``values[b, i]`` written at token ``index[b, i]`` (differentiable)."""
    return x.scatter(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]), values.to(x.dtype))


def topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest ``scores`` per row, in increasing (original) order."""
    return scores.topk(k, dim=1, sorted=False).indices.sort(dim=1).values


def selected_first(selected: torch.Tensor, minimum: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token indices ``[B, k]``: each row's ``selected`` tokens in order, padded at the end with
    unselected ones (``k``: the largest count in the batch, at least ``minimum``), and which
    entries are selected. ``k`` depends on the data (a device sync): for routing by a per-token rule."""
    tokens = selected.shape[1]
    k = min(tokens, max(minimum, int(selected.sum(dim=1).max())))
    position = torch.arange(tokens, device=selected.device)
    chosen = torch.where(selected, position, position + tokens).argsort(dim=1)[:, :k]
    return chosen, selected.gather(1, chosen)


def with_prefix(chosen: torch.Tensor, prefix: int) -> torch.Tensor:
    """Token indices of the ``prefix`` leading tokens followed by the patch indices ``chosen``."""
    if not prefix:
        return chosen
    head = torch.arange(prefix, device=chosen.device).expand(chosen.shape[0], prefix)
    return torch.cat([head, chosen + prefix], dim=1)


def _query(h: torch.Tensor, class_token: int | None) -> torch.Tensor:
    """``[B, 1, C]``: the class token, or the mean token when the model has none."""
    return h[:, class_token : class_token + 1] if class_token is not None else h.mean(dim=1, keepdim=True)


def check_attn_block(block: nn.Module) -> None:
    """Raise unless ``block`` has what :func:`cls_attention` reads."""
    attn = getattr(block, "attn", None)
    if not isinstance(getattr(attn, "qkv", None), nn.Linear) or not isinstance(getattr(block, "norm1", None),
                                                                                 nn.Module) \
            or not isinstance(getattr(attn, "num_heads", None), int):
        raise ValueError(f"score='attn' needs blocks with `norm1`, `attn.qkv` (one fused nn.Linear) and "
                         f"`attn.num_heads`; {type(block).__name__} lacks them: use score='cosine' or 'norm'")


def cls_attention(block: nn.Module, x: torch.Tensor, class_token: int | None) -> torch.Tensor:
    """Attention of the class token over all tokens, ``[B, N]``, averaged over heads, from
    ``block``'s own ``norm1`` and q/k projections: one query row against all keys, so it costs a
    third of the block's qkv projection and no attention matrix."""
    attn = block.attn
    qkv: nn.Linear = attn.qkv
    dim = qkv.out_features // 3
    heads = attn.num_heads
    h = block.norm1(x)
    bias = qkv.bias
    q = F.linear(_query(h, class_token), qkv.weight[:dim], None if bias is None else bias[:dim])
    k = F.linear(h, qkv.weight[dim : 2 * dim], None if bias is None else bias[dim : 2 * dim])
    b, n, _ = k.shape
    q = q.view(b, 1, heads, dim // heads).transpose(1, 2)  # B, H, 1, d
    k = k.view(b, n, heads, dim // heads).transpose(1, 2)  # B, H, N, d
    if isinstance(getattr(attn, "q_norm", None), nn.Module):
        q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q @ k.transpose(-2, -1)).squeeze(2) * (dim // heads) ** -0.5  # B, H, N
    return logits.float().softmax(dim=-1).mean(dim=1)


def score_tokens(method: str, x: torch.Tensor, block: nn.Module | None = None, class_token: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Importance of every token of ``x`` (``[B, N, C]``) as ``[B, N]``; higher is kept.

    ``"attn"``: class-token attention from ``block``'s q/k projections; ``"cosine"``: cosine
    similarity to the class token (the mean token without one); ``"norm"``: feature L2 norm;
    ``"random"``: uniform noise from ``generator``. Computed without gradient.
    """
    with torch.no_grad():
        if method == "attn":
            return cls_attention(block, x, class_token)
        if method == "cosine":
            return F.cosine_similarity(x.float(), _query(x, class_token).float(), dim=-1)
        if method == "norm":
            return x.float().norm(dim=-1)
        if method == "random":
            noise = torch.rand(x.shape[:2], generator=generator, device=generator.device if generator else "cpu")
            return noise.to(x.device)
    raise ValueError(f"Expected `score` in {list(SCORES)}, got score={method!r}")
