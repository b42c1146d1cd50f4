"""The update rules as pure functions: RigL/SET drop-and-grow and the pruning score, with
non-finite weights and gradients (the schedules themselves are tested through the callbacks
against their formulas: tests/callbacks/test_{nm_sparsity,magnitude_pruning,dynamic_sparsity}.py)."""

import math

import torch

from lit_eff.sparsity import NMSchedule, PruningSchedule, drop_and_grow, drop_fraction, prune, pruning_scores
from lit_eff.sparsity.rigl import is_update, last_update


def test_drop_and_grow_keeps_the_count_and_follows_the_rule():
    gen = torch.Generator().manual_seed(0)
    weight, grad = torch.randn(8, 8, generator=gen), torch.randn(8, 8, generator=gen)
    mask = torch.rand(8, 8, generator=gen) < 0.5
    weight = weight * mask
    n, k = int(mask.sum()), 5
    new = drop_and_grow(weight, mask, k, grad.abs())
    assert int(new.sum()) == n
    # re-derived: keep the n - k largest |w| among active, then the k largest |g| among the rest
    order = torch.where(mask, weight.abs(), -1.0).flatten().sort(descending=True, stable=True).indices
    kept = torch.zeros(64, dtype=torch.bool)
    kept[order[: n - k]] = True
    order = torch.where(kept, -1.0, grad.abs().flatten()).sort(descending=True, stable=True).indices
    kept[order[:k]] = True
    assert torch.equal(new.flatten(), kept)


def test_drop_and_grow_with_nan_weights_and_gradients_keeps_the_count():
    mask = torch.tensor([True, True, True, False, False, False])
    weight = torch.tensor([float("nan"), 2.0, 1.0, 0.0, 0.0, 0.0])
    grad = torch.tensor([0.0, 0.0, 0.0, float("nan"), 0.5, float("nan")])
    new = drop_and_grow(weight, mask, 2, grad)
    assert int(new.sum()) == 3
    # drop: keep |2.0| (the NaN weight ranks lowest); grow: 0.5, then the tie at 0 goes to the lower
    # index (the just-dropped position 0); NaN gradients never win
    assert new.tolist() == [True, True, False, False, True, False]


def test_pruning_scores_keep_pruned_weights_pruned_and_rank_nan_just_above_them():
    weight = torch.tensor([[0.0, 5.0, float("nan"), 0.0, 3.0, 1.0, 0.0, 2.0]])
    mask = torch.tensor([[False, True, True, True, True, True, True, True]])
    scores = pruning_scores(weight, mask)
    assert scores[0, 0] == 0 and 0 < scores[0, 2] < scores[0, 3] < scores[0, 5]  # pruned < NaN < kept zero < kept
    masks, densities = prune({"w": scores}, 0.5)
    assert masks["w"].tolist() == [[False, True, False, False, True, True, False, True]] and densities["w"] == 0.5
    floor = pruning_scores(weight, mask, nm=(2, 4))
    assert floor[0, 1] == math.inf and floor[0, 4] == math.inf  # the N:M mask of the effective weight


def test_schedules_are_functions_of_the_step():
    assert [is_update(t, 3, 10) for t in (0, 3, 6, 9, 10, 12)] == [False, True, True, True, False, False]
    assert last_update(3, 10, 100) == 9 and last_update(5, 4, 4) is None and last_update(2, 8, 8) == 6
    assert drop_fraction(0, 0.3, 100) == 0.3 and drop_fraction(100, 0.3, 100) == 0.0
    schedule = PruningSchedule(0.6, 0.1, start_step=0, end_step=7, update_every=3)
    assert [schedule.update_step(t) for t in range(9)] == [0, 0, 0, 3, 3, 3, 6, 7, 7]
    assert schedule.last_update(5) == 3
    nm = NMSchedule(1, 4, 8, method="mask_decay", decay_rate=0.5, structure_decay="stepwise", dense_steps=1,
                    finetune_steps=2)
    # decay over steps 1-5: frame i of 3 starts at 1 + floor(i * 5 / 3) = 1, 2, 4
    assert [nm.frame(t) for t in range(8)] == [(4, 4), (3, 4), (2, 4), (2, 4), (1, 4), (1, 4), (1, 4), (1, 4)]
    assert nm.beta(3) == math.exp(-1.0) and nm.density(3) == 1.0 and nm.density(6) == 0.25
