"""Functional masks: exact N:M groups, exact counts, deterministic ties, layer densities."""

import math

import pytest
import torch

from lit_eff.seeding import generator
from lit_eff.sparsity import (
    erk_densities,
    global_magnitude_masks,
    keep_largest,
    magnitude_mask,
    nm_mask,
    random_mask,
    uniform_densities,
)

NM = [(1, 4), (2, 4), (3, 4), (1, 8), (2, 8), (4, 16), (1, 32), (8, 32)]


def _check_groups(weight_in_last: torch.Tensor, mask_in_last: torch.Tensor, n: int, m: int) -> None:
    """Exactly n kept per group of m, and every kept |w| >= every pruned |w| of its group."""
    w = weight_in_last.abs().reshape(-1, m)
    keep = mask_in_last.reshape(-1, m)
    assert keep.dtype == torch.bool
    assert (keep.sum(1) == n).all()
    smallest_kept = torch.where(keep, w, torch.inf).min(1).values
    largest_pruned = torch.where(keep, -torch.inf, w).max(1).values
    assert (smallest_kept >= largest_pruned).all()


@pytest.mark.parametrize("n,m", NM)
def test_nm_mask_linear_groups_along_inputs(n, m):
    weight = torch.randn(6, 64, generator=torch.Generator().manual_seed(n * 100 + m))
    mask = nm_mask(weight, n, m)
    assert mask.shape == weight.shape
    _check_groups(weight, mask, n, m)
    # the masked weight has exactly n nonzeros in every group
    assert ((weight * mask).reshape(-1, m).count_nonzero(1) == n).all()


@pytest.mark.parametrize("n,m", [(2, 4), (1, 8), (4, 16)])
def test_nm_mask_conv_groups_along_input_channels(n, m):
    weight = torch.randn(5, 32, 3, 2, generator=torch.Generator().manual_seed(m))
    mask = nm_mask(weight, n, m)
    assert mask.shape == weight.shape and mask.is_contiguous()
    # groups are m consecutive input channels at one (out, kh, kw) position
    _check_groups(weight.permute(0, 2, 3, 1), mask.permute(0, 2, 3, 1), n, m)
    conv1d = torch.randn(4, 16, 5)
    _check_groups(conv1d.permute(0, 2, 1), nm_mask(conv1d, n, min(m, 16)).permute(0, 2, 1), n, min(m, 16))


def test_nm_mask_2_4_equals_torch_ao_weight_norm_sparsifier():
    from torch.ao.pruning import WeightNormSparsifier

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 24))
    weight = model[0].weight.detach().clone()
    sparsifier = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
    sparsifier.prepare(model, config=[{"tensor_fqn": "0.weight"}])
    sparsifier.step()
    theirs = model[0].parametrizations.weight[0].mask.bool()
    assert torch.equal(nm_mask(weight, 2, 4), theirs)


@pytest.mark.parametrize("n,m", NM)
def test_nm_mask_ties_keep_the_lower_index(n, m):
    # few distinct values: many ties, on both code paths (pairwise ranks for m <= 8, topk above)
    weight = torch.randint(-2, 3, (7, 4 * m), generator=torch.Generator().manual_seed(m)).float()
    weight[0] = 1.0  # a row of equal weights keeps the first n of every group
    mask = nm_mask(weight, n, m)
    _check_groups(weight, mask, n, m)
    order = weight.abs().reshape(-1, m).sort(dim=1, descending=True, stable=True).indices[:, :n]
    expected = torch.zeros(weight.numel() // m, m, dtype=torch.bool).scatter_(1, order, True)
    assert torch.equal(mask.reshape(-1, m), expected)
    assert torch.equal(mask[0].reshape(-1, m), (torch.arange(m) < n).expand(4, m))


def test_nm_masks_ranked_in_blocks_equal_the_stable_sort(monkeypatch):
    # on CPU the groups are ranked in cache-sized blocks: force 3-group blocks over uneven layers
    from lit_eff.sparsity import masks as module

    monkeypatch.setattr(module, "_BLOCK", 12)
    weights = [torch.randint(-3, 4, (5, 8), generator=torch.Generator().manual_seed(i)).float() for i in range(3)]
    before = [w.clone() for w in weights]
    masks = module.nm_masks(weights, 2, 4)
    assert all(torch.equal(w, b) for w, b in zip(weights, before))  # magnitudes are taken on a copy
    for weight, mask in zip(weights, masks):
        order = weight.abs().reshape(-1, 4).sort(dim=1, descending=True, stable=True).indices[:, :2]
        assert torch.equal(mask.reshape(-1, 4), torch.zeros(10, 4, dtype=torch.bool).scatter_(1, order, True))


def test_nm_mask_keeps_dtype_independent_and_ignores_autograd():
    weight = torch.randn(4, 8, requires_grad=True)
    assert torch.equal(nm_mask(weight.bfloat16(), 2, 4), nm_mask(weight.bfloat16().float(), 2, 4))
    assert not nm_mask(weight, 2, 4).requires_grad


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.73, 0.99])
def test_magnitude_mask_prunes_exactly_the_smallest(sparsity):
    weight = torch.randn(13, 17, generator=torch.Generator().manual_seed(1))
    mask = magnitude_mask(weight, sparsity)
    assert mask.shape == weight.shape
    assert (~mask).sum() == round(sparsity * weight.numel())
    if 0 < sparsity:
        assert weight.abs()[~mask].max() <= weight.abs()[mask].min()


def test_magnitude_mask_exact_with_ties():
    weight = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 2.0, 0.0, 1.0])
    mask = magnitude_mask(weight, 0.5)  # 4 zeros: the three 0.0 and the last of the 1.0s
    assert mask.tolist() == [True, False, True, False, True, True, False, False]


def test_global_magnitude_masks_use_one_threshold():
    g = torch.Generator().manual_seed(2)
    weights = {"small": torch.randn(8, 8, generator=g) * 0.1, "big": torch.randn(16, 8, generator=g)}
    masks = global_magnitude_masks(weights, 0.6)
    total = sum(w.numel() for w in weights.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.6 * total)
    kept = torch.cat([weights[k].abs()[masks[k]] for k in weights])
    pruned = torch.cat([weights[k].abs()[~masks[k]] for k in weights])
    assert pruned.max() <= kept.min()
    # a global threshold prunes the low-magnitude layer much harder than a per-layer one
    assert (~masks["small"]).float().mean() > 0.9 > (~masks["big"]).float().mean()


def test_random_mask_exact_count_and_rank_consistent():
    first = random_mask((30, 20), 0.3, generator("run", 0, "spdf", "blocks.0.fc1"))
    again = random_mask((30, 20), 0.3, generator("run", 0, "spdf", "blocks.0.fc1"))
    other = random_mask((30, 20), 0.3, generator("run", 0, "spdf", "blocks.1.fc1"))
    assert first.dtype == torch.bool and first.sum() == round(0.3 * 600)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert random_mask((4, 4), 1.0).all()


# --------------------------------------------------------------------------------------------
# non-finite weights: masks keep exactly the count asked for
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,m", [(2, 4), (1, 8), (4, 16)])  # pairwise ranks (m <= 8) and topk
def test_a_nan_in_a_group_still_keeps_exactly_n_and_ranks_lowest(n, m):
    weight = torch.randn(6, 4 * m, generator=torch.Generator().manual_seed(m))
    weight[0, 0] = weight[2, m + 1] = float("nan")
    weight[1, 0] = float("inf")  # a huge weight ranks highest
    mask = nm_mask(weight, n, m)
    assert (mask.reshape(-1, m).sum(1) == n).all()
    assert not mask[0, 0] and not mask[2, m + 1] and mask[1, 0]
    finite = torch.nan_to_num(weight, nan=0.0)  # elsewhere the same mask as without the NaNs
    assert torch.equal(mask[3:], nm_mask(finite[3:], n, m))


@pytest.mark.parametrize("n,m", [(2, 4), (4, 16)])
def test_an_all_nan_layer_gets_an_exact_mask_not_all_ones(n, m):
    weight = torch.full((4, 2 * m), float("nan"))
    mask = nm_mask(weight, n, m)
    assert (mask.reshape(-1, m).sum(1) == n).all()
    assert torch.equal(mask.reshape(-1, m), (torch.arange(m) < n).expand(8, m))  # ties: the lower index
    assert int(magnitude_mask(weight, 0.75).sum()) == weight.numel() // 4
    masks = global_magnitude_masks({"nan": weight, "ok": torch.randn(4, 2 * m)}, 0.5)
    assert int(masks["nan"].sum()) == 0 and int(masks["ok"].sum()) == 4 * 2 * m  # NaN ranks below every |w|
    assert keep_largest(torch.tensor([float("nan"), 1.0, float("nan"), 0.5]), 3).tolist() == [True, True, False, True]


SHAPES = {"patch": (32, 1, 2, 2), "qkv": (96, 32), "fc1": (64, 32), "fc2": (32, 64), "head": (10, 32)}


@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 0.9, 1.0])
def test_erk_densities_meet_the_target(density):
    densities = erk_densities(SHAPES, density)
    sizes = {k: math.prod(s) for k, s in SHAPES.items()}
    overall = sum(densities[k] * sizes[k] for k in SHAPES) / sum(sizes.values())
    assert overall == pytest.approx(density, rel=1e-9)
    assert all(0 < d <= 1 for d in densities.values())
    # non-dense layers follow eps * sum(dims) / prod(dims) with one eps
    free = [k for k, d in densities.items() if d < 1]
    eps = {k: densities[k] * sizes[k] / sum(SHAPES[k]) for k in free}
    assert len(set(round(v, 9) for v in eps.values())) <= 1


def test_erk_makes_small_layers_dense_and_resolves():
    densities = erk_densities({"tiny": (4, 4), "huge": (512, 512)}, 0.5)
    assert densities["tiny"] == 1.0
    assert (16 + densities["huge"] * 512 * 512) / (16 + 512 * 512) == pytest.approx(0.5)
    assert uniform_densities(SHAPES, 0.25) == {k: 0.25 for k in SHAPES}


@pytest.mark.parametrize("call,match", [
    (lambda: nm_mask(torch.randn(4, 8), 4, 4), r"Expected `n` < `m`, got n=4, m=4"),
    (lambda: nm_mask(torch.randn(4, 8), 5, 4), r"Expected `n` < `m`, got n=5, m=4"),
    (lambda: nm_mask(torch.randn(4, 8), 0, 4), r"Expected `n` > 0, got n=0"),
    (lambda: nm_mask(torch.randn(4, 8), -1, 4), r"Expected `n` > 0, got n=-1"),
    (lambda: nm_mask(torch.randn(4, 8), 1.5, 4), r"Expected `n` to be an integer, got n=1.5"),
    (lambda: nm_mask(torch.randn(4, 30), 2, 4),
     r"Expected `m` to divide the input size of a weight with shape \(4, 30\), got m=4 for 30 inputs"),
    (lambda: nm_mask(torch.randn(4, 6, 3, 3), 2, 4, name="conv1"),
     r"Expected `m` to divide the input size of layer `conv1` \(weight shape \(4, 6, 3, 3\)\), got m=4 for 6 inputs"),
    (lambda: nm_mask(torch.randn(8), 2, 4), r"at least 2 dimensions \[out, in, ...\], got shape \(8,\)"),
    (lambda: magnitude_mask(torch.randn(4), 1.2), r"Expected `sparsity` in \[0, 1\), got sparsity=1.2"),
    (lambda: magnitude_mask(torch.randn(4), 1.0), r"Expected `sparsity` in \[0, 1\), got sparsity=1.0"),
    (lambda: magnitude_mask(torch.randn(4), -0.1), r"Expected `sparsity` in \[0, 1\), got sparsity=-0.1"),
    (lambda: global_magnitude_masks({"a": torch.randn(4)}, 1.5), r"Expected `sparsity` in \[0, 1\), got sparsity=1.5"),
    (lambda: global_magnitude_masks({}, 0.5), r"Expected at least one weight in `weights`, got none"),
    (lambda: random_mask((4,), 0.0), r"Expected `density` in \(0, 1\], got density=0.0"),
    (lambda: erk_densities(SHAPES, 1.1), r"Expected `density` in \(0, 1\], got density=1.1"),
    (lambda: erk_densities({}, 0.5), r"Expected at least one layer shape in `shapes`, got none"),
    (lambda: uniform_densities(SHAPES, 0), r"Expected `density` in \(0, 1\], got density=0"),
])
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
