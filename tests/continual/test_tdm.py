"""SparCL's task-aware dynamic masking: the mask update and its bounds against a re-derivation of
the authors' code (numpy percentile pruning and random growth; the bound index of their schedule)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lit_eff.callbacks import TaskAwareMasking
from lit_eff.continual import bounds, percentile, prune_and_grow, prune_mask


# --- the official algorithm, re-derived ------------------------------------------------------------
def official_prune(weight: np.ndarray, grad: np.ndarray | None, lmd: float, ratio: float):
    """Irregular pruning: keep the entries of |w| + lmd·|g| strictly above the percentile."""
    imp = np.abs(weight) if grad is None else np.abs(weight) + lmd * np.abs(grad)
    above = (imp > np.percentile(imp, ratio * 100)).astype(np.float32)
    return above, weight * above


def official_grow_count(pruned_weight: np.ndarray, lower: float, upper: float) -> int:
    """How many zero entries the growth re-activates (before its random choice)."""
    if upper == lower:  # "no grow, keep the mask"
        return 0
    flat = pruned_weight.reshape(-1)
    zeros = np.where(flat == 0)[0]
    num = int(np.size(zeros) - upper * np.size(flat))
    num = num if num < np.size(zeros) else np.size(zeros)
    return num if num > 0 else 0


def official_bound_index(epoch: int, upper: str, decay: str) -> int:
    decays, uppers, index = [int(d) for d in decay.split("-")], upper.split("-"), 0
    if len(decays) + 1 <= len(uppers):
        for d in decays:
            if epoch >= d:
                index += 1
    else:
        for i, _ in enumerate(uppers):
            if epoch >= decays[i] and i != len(uppers) - 1:
                index += 1
    return index


# --- tests -----------------------------------------------------------------------------------------
def sparse_layer(shape=(48, 40), sparsity=0.75, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=gen)
    weight[torch.rand(shape, generator=gen) < sparsity] = 0.0  # a pruned layer: exact zeros
    grad = torch.randn(shape, generator=gen) * 0.3
    grad[weight == 0] = 0.0  # the masked gradient the update sees
    return weight, grad


@pytest.mark.parametrize("q", [0.0, 12.5, 50.0, 74.9, 75.0, 76.0, 99.99, 100.0])
def test_percentile_is_numpys(q):
    values = torch.randn(997, generator=torch.Generator().manual_seed(1)).abs()
    assert float(percentile(values, q)) == pytest.approx(float(np.percentile(values.numpy(), q)), rel=1e-6, abs=0)


@pytest.mark.parametrize("with_grad", [True, False])
@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.76, 0.9])
def test_prune_matches_official(ratio, with_grad):
    weight, grad = sparse_layer()
    ours = prune_mask(weight, grad if with_grad else None, 0.5, ratio)
    above, _ = official_prune(weight.numpy(), grad.numpy() if with_grad else None, 0.5, ratio)
    assert torch.equal(ours, torch.from_numpy(above).bool())


@pytest.mark.parametrize("low,up", [(0.76, 0.75), (0.75, 0.74), (0.8, 0.5), (0.75, 0.75), (0.75, 0.0)])
def test_prune_and_grow_matches_official(low, up):
    weight, grad = sparse_layer()
    mask = prune_and_grow(weight, grad, 0.5, low, up, torch.Generator().manual_seed(0))
    _, pruned = official_prune(weight.numpy(), grad.numpy(), 0.5, low)
    if up == 0:
        assert mask.all()  # the official code grows to a dense mask
        return
    survivors = torch.from_numpy(pruned != 0)
    assert torch.equal(mask & survivors, survivors)  # every weight the pruning keeps stays
    grown = mask & ~survivors  # re-activated entries: zeros after pruning, at value 0
    assert int(grown.sum()) == official_grow_count(pruned, low, up)
    assert (torch.from_numpy(pruned)[grown] == 0).all()
    if low != up:
        assert abs(int((~mask).sum()) - up * mask.numel()) < 1  # sparsity p_up, up to one entry


def test_growth_is_random_and_seeded():
    weight, grad = sparse_layer()
    a, b, c = (prune_and_grow(weight, grad, 0.5, 0.8, 0.7, torch.Generator().manual_seed(s)) for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bounds_match_official_schedule():
    lower, upper, decay = "0.75-0.76-0.75", "0.74-0.75-0.75", "5-45"
    for epoch in range(60):
        index = official_bound_index(epoch, upper, decay)
        expected = float(lower.split("-")[index]), float(upper.split("-")[index])
        assert bounds(epoch, [0.75, 0.76, 0.75], [0.74, 0.75, 0.75], [5, 45]) == expected
        assert TaskAwareMasking().bounds(epoch) == expected  # the callback's defaults are SparCL's


@pytest.mark.parametrize("kwargs,match", [
    ({"sparsity": 1.0}, r"`sparsity`.*got sparsity=1.0"),
    ({"lower": [0.75, 0.76]}, r"one sparsity more than `boundaries`.*2 lower, 3 upper and 2 boundaries"),
    ({"upper": [0.74, 0.8, 0.75]}, r"upper\[1\] <= lower\[1\].*lower\[1\]=0.76, upper\[1\]=0.8"),
    ({"boundaries": [45, 5]}, r"`boundaries` to increase strictly, got boundaries=\[45, 5\]"),
    ({"boundaries": [0, 5]}, r"`boundaries\[0\]` to be an integer >= 1, got boundaries\[0\]=0"),
    ({"update_every_epochs": 0}, r"`update_every_epochs` to be an integer >= 1"),
    ({"grad_weight": -1}, r"`grad_weight`.*got grad_weight=-1"),
    ({"lower": 0.75}, r"`lower` to be a list, got lower=0.75"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TaskAwareMasking(**kwargs)
