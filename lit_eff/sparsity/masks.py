"""Functional masks: which weights to keep, as boolean tensors (``True`` = kept).

Nothing here touches a module; :mod:`lit_eff.sparsity.parametrize` applies the masks.

- :func:`nm_mask` keeps the ``n`` largest ``|w|`` of every ``m`` consecutive weights along the
  input dimension (SR-STE's layout: a convolution's groups run along input channels).
- :func:`magnitude_mask` and :func:`global_magnitude_masks` prune exactly
  ``round(sparsity * numel)`` weights of smallest magnitude, per layer or with one threshold
  across layers; :func:`random_mask` keeps exactly ``round(density * numel)`` at random.
- :func:`erk_densities` and :func:`uniform_densities` distribute an overall density over layers.

Ties are broken by position, the same way everywhere: among equal magnitudes the weight with
the lower index is kept, so every process computing a mask from the same weights gets the same
mask. A NaN ranks below every number, so a group or layer holding NaNs still keeps exactly the
count asked for::

    >>> w = torch.tensor([[0.1, -3.0, 2.0, 0.5]])
    >>> nm_mask(w, 2, 4)
    tensor([[False,  True,  True, False]])
    >>> magnitude_mask(w, 0.25)
    tensor([[False,  True,  True,  True]])
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from lit_eff.validation import check_density, check_nm, check_sparsity

__all__ = [
    "erk_densities",
    "global_magnitude_masks",
    "keep_largest",
    "magnitude_mask",
    "nm_mask",
    "nm_masks",
    "random_mask",
    "uniform_densities",
]


def _input_last(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` viewed as ``[out, *kernel, in]`` (a Linear's ``[out, in]`` is unchanged)."""
    if weight.ndim < 2:
        raise ValueError("Expected a weight with at least 2 dimensions [out, in, ...], "
                         f"got shape {tuple(weight.shape)}")
    if weight.ndim == 2:
        return weight
    return weight.movedim(1, -1)


# ---------------------------------------------------------------------------------------------
# N:M
# ---------------------------------------------------------------------------------------------
_BLOCK = 1 << 18  # scores ranked at a time on CPU (1 MiB of float32): the comparisons stay in cache


def _magnitudes_(weights: torch.Tensor) -> torch.Tensor:
    """``|w|`` in place, NaN as −1: it ranks below every magnitude (an exact n per group)."""
    return weights.abs_().nan_to_num_(nan=-1.0, posinf=math.inf)


def _rank_keep(weights: torch.Tensor, n: int) -> torch.Tensor:
    """Keep the ``n`` largest ``|w|`` of each row of ``weights`` [G, m] (overwritten with its
    magnitudes) by pairwise comparison.

    The rank of column i counts the columns that beat it: larger, or equal and to its left.
    One comparison per pair of columns (``m(m−1)/2`` on [G] vectors) settles both ranks: if
    column i (left of j) is ``>=`` column j, it beats j, otherwise j beats i. Fastest for small
    ``m``; on CPU the rows go in cache-sized blocks (each comparison reads every column's memory).
    """
    keep = torch.empty(weights.shape, dtype=torch.bool, device=weights.device)
    rows = max(1, _BLOCK // weights.shape[1]) if weights.device.type == "cpu" else max(1, weights.shape[0])
    for start in range(0, weights.shape[0], rows):
        _rank_block(_magnitudes_(weights[start:start + rows]), n, keep[start:start + rows])
    return keep


def _rank_block(scores: torch.Tensor, n: int, keep: torch.Tensor) -> None:
    m = scores.shape[1]
    cols = scores.unbind(1)
    ranks = [torch.full(scores.shape[:1], m - 1 - i, dtype=torch.uint8, device=scores.device) for i in range(m)]
    for i in range(m):
        for j in range(i + 1, m):
            left_wins = torch.ge(cols[i], cols[j]).view(torch.uint8)
            ranks[j] += left_wins
            ranks[i] -= left_wins  # starts at m−1−i: every column right of i beats it unless i wins
    for i in range(m):
        torch.lt(ranks[i], n, out=keep[:, i])


def _topk_keep(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Keep the ``n`` largest of each row of ``scores`` [G, m] with ``topk``.

    The kept set is unique unless the n-th and (n+1)-th largest are equal; only those rows
    are redone with a stable sort, so ties go to the lower index as in :func:`_rank_keep`.
    """
    values, index = scores.topk(n + 1, dim=1)
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    keep.scatter_(1, index[:, :n], True)
    tied = (values[:, n - 1] == values[:, n]).nonzero().squeeze(1)
    if tied.numel():
        order = scores[tied].sort(dim=1, descending=True, stable=True).indices[:, :n]
        fixed = torch.zeros((tied.numel(), scores.shape[1]), dtype=torch.bool, device=scores.device)
        keep[tied] = fixed.scatter_(1, order, True)
    return keep


def nm_mask(weight: torch.Tensor, n: int, m: int, name: str | None = None) -> torch.Tensor:
    """The N:M mask of ``weight``: ``n`` kept out of every ``m`` consecutive input weights.

    A Linear weight ``[out, in]`` is grouped along ``in``; a convolution weight
    ``[out, in, *kernel]`` is grouped along ``in`` at each kernel position (it is permuted to
    ``[out, *kernel, in]`` first, as SR-STE does). The mask has ``weight``'s shape and layout.
    ``name`` (a layer name) only makes error messages clearer.

    >>> nm_mask(torch.tensor([[4.0, -1.0, 0.5, 3.0, 1.0, 1.0, 1.0, 1.0]]), 1, 4)
    tensor([[ True, False, False, False,  True, False, False, False]])
    """
    return nm_masks([weight], n, m, None if name is None else [name])[0]


def nm_masks(weights: Sequence[torch.Tensor], n: int, m: int, names: Sequence[str] | None = None) -> list[torch.Tensor]:
    """:func:`nm_mask` of several weights at once: their groups are ranked in one batch, so
    the cost is a handful of tensor ops whatever the number of layers (the per-step mask
    refresh of N:M training is dominated by per-op overhead when done layer by layer).
    Weights on several devices or dtypes are batched per (device, dtype).

    >>> a, b = nm_masks([torch.tensor([[1.0, -2.0, 3.0, 0.0]]), torch.tensor([[0.0, 5.0, 4.0, 1.0]])], 2, 4)
    >>> a, b
    (tensor([[False,  True,  True, False]]), tensor([[False,  True,  True, False]]))
    """
    check_nm(n, m)
    views = []
    for i, weight in enumerate(weights):
        view = _input_last(weight.detach())
        if view.shape[-1] % m:
            what = f"layer `{names[i]}` (weight shape {tuple(weight.shape)})" if names else \
                f"a weight with shape {tuple(weight.shape)}"
            raise ValueError(f"Expected `m` to divide the input size of {what}, got m={m} for {view.shape[-1]} inputs")
        views.append(view)
    out: list[torch.Tensor | None] = [None] * len(views)
    groups: dict[tuple, list[int]] = {}
    for i, view in enumerate(views):
        groups.setdefault((view.device, view.dtype), []).append(i)
    for members in groups.values():
        weights_ = torch.cat([views[i].reshape(-1, m) for i in members])  # a copy: made |w| in place
        keep = _rank_keep(weights_, n) if m <= 8 else _topk_keep(_magnitudes_(weights_), n)
        for i, part in zip(members, keep.split([views[i].numel() // m for i in members])):
            part = part.reshape(views[i].shape)
            out[i] = part if weights[i].ndim == 2 else part.movedim(-1, 1).contiguous()
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# unstructured
# ---------------------------------------------------------------------------------------------
def _prune_smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """A flat mask pruning exactly the ``k`` smallest of the flat, NaN-free ``scores`` (ties: the
    higher index is pruned first, so the lower index is kept)."""
    keep = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if k <= 0:
        return keep
    if k >= scores.numel():
        return keep.zero_()
    threshold = scores.kthvalue(k).values
    below = scores < threshold
    at = scores == threshold
    need = k - int(below.sum())
    # among the positions at the threshold, prune the last `need` ones
    from_end = at.flip(0).cumsum(0).flip(0)
    keep &= ~(below | (at & (from_end <= need)))
    return keep


def _flat_scores(scores: torch.Tensor) -> torch.Tensor:
    """Flat scores in a dtype every device's ``kthvalue`` supports, NaN as ``-inf``."""
    flat = scores.detach().flatten()
    flat = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
    return torch.where(flat.isnan(), -math.inf, flat)


def keep_largest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """A mask shaped like ``scores`` keeping exactly its ``k`` largest entries (ties: the lower
    flat index wins; NaN ranks lowest).

    >>> keep_largest(torch.tensor([[1.0, 3.0], [3.0, float("nan")]]), 2)
    tensor([[False,  True],
            [ True, False]])
    """
    flat = _flat_scores(scores)
    return _prune_smallest(flat, flat.numel() - int(k)).reshape(scores.shape)


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune exactly ``round(sparsity * weight.numel())`` weights of smallest ``|w|``.

    >>> magnitude_mask(torch.tensor([3.0, -1.0, 2.0, 0.0]), 0.5)
    tensor([ True, False,  True, False])
    """
    check_sparsity(sparsity)
    return keep_largest(weight.detach().abs(), weight.numel() - round(sparsity * weight.numel()))


def global_magnitude_masks(weights: Mapping[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Masks for several layers with one magnitude threshold across all of them.

    Exactly ``round(sparsity * total)`` weights are pruned in all (``total`` = the weights'
    summed size), the smallest ``|w|`` wherever they are; layers then differ in sparsity.

    >>> masks = global_magnitude_masks({"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0, 4.0])}, 0.5)
    >>> masks["a"], masks["b"]
    (tensor([False, False]), tensor([True, True]))
    """
    check_sparsity(sparsity)
    if not weights:
        raise ValueError("Expected at least one weight in `weights`, got none")
    flat = [_flat_scores(w.abs()).float() for w in weights.values()]
    scores = torch.cat(flat)
    keep = _prune_smallest(scores, round(sparsity * scores.numel()))
    parts = keep.split([f.numel() for f in flat])
    return {name: part.reshape(w.shape) for (name, w), part in zip(weights.items(), parts)}


def random_mask(shape: Sequence[int] | torch.Size, density: float, generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> torch.Tensor:
    """A mask keeping exactly ``round(density * numel)`` positions chosen at random.

    Pass a generator from :func:`lit_eff.seeding.generator` so that every process draws the same
    mask; it is created on the generator's device unless ``device`` says otherwise.

    >>> random_mask((4, 8), 0.25, torch.Generator().manual_seed(0)).sum()
    tensor(8)
    """
    check_density(density)
    if device is None:
        device = generator.device if generator is not None else "cpu"
    scores = torch.rand(tuple(shape), generator=generator, device=device)
    return keep_largest(scores, round(density * scores.numel()))


# ---------------------------------------------------------------------------------------------
# distributing a density over layers
# ---------------------------------------------------------------------------------------------
def uniform_densities(shapes: Mapping[str, Sequence[int]], density: float) -> dict[str, float]:
    """Every layer at ``density``."""
    check_density(density)
    return {name: float(density) for name in shapes}


def erk_densities(shapes: Mapping[str, Sequence[int]], density: float) -> dict[str, float]:
    """Erdős–Rényi-Kernel densities (RigL): ``density_l = eps * sum(shape_l) / prod(shape_l)``.

    ``eps`` is solved so that the weight-count-weighted mean density equals ``density``; a layer
    whose density would exceed 1 is made dense and ``eps`` is solved again for the others.

    >>> d = erk_densities({"small": (8, 8), "big": (256, 256)}, 0.1)
    >>> round((d["small"] * 64 + d["big"] * 65536) / (64 + 65536), 6)
    0.1
    """
    check_density(density)
    if not shapes:
        raise ValueError("Expected at least one layer shape in `shapes`, got none")
    if density == 1.0:
        return {name: 1.0 for name in shapes}
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    raw = {name: sum(shape) / sizes[name] for name, shape in shapes.items()}
    budget = density * sum(sizes.values())  # nonzero weights to distribute
    dense: set[str] = set()
    while True:
        free = [name for name in shapes if name not in dense]
        if not free:
            break
        eps = (budget - sum(sizes[name] for name in dense)) / sum(raw[name] * sizes[name] for name in free)
        too_dense = {name for name in free if eps * raw[name] > 1.0}
        if not too_dense:
            break
        dense |= too_dense
    return {name: 1.0 if name in dense else eps * raw[name] for name in shapes}
