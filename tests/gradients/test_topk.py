import pytest
import torch

from lit_eff.gradients import kept_count, topk_mask


def test_keeps_exactly_the_largest_magnitudes():
    g = torch.randn(16, 24, generator=torch.Generator().manual_seed(0))
    mask = topk_mask(g, 0.2)
    assert mask.dtype == torch.bool and mask.shape == g.shape
    assert int(mask.sum()) == round(0.2 * g.numel())
    assert g.abs()[mask].min() > g.abs()[~mask].max()


def test_keeps_only_allowed_entries_and_counts_among_them():
    g = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    allowed = torch.rand(8, 16, generator=torch.Generator().manual_seed(2)) > 0.5
    g[~allowed] *= 100  # the largest gradients sit on pruned weights: still never kept
    mask = topk_mask(g, 0.25, allowed)
    assert not (mask & ~allowed).any()
    assert int(mask.sum()) == round(0.25 * int(allowed.sum()))
    assert g.abs()[mask].min() > g.abs()[allowed & ~mask].max()


def test_full_density_keeps_all_allowed_and_tiny_density_keeps_one():
    g = torch.randn(4, 8)
    allowed = torch.zeros(4, 8, dtype=torch.bool)
    allowed[0] = True
    assert torch.equal(topk_mask(g, 1.0, allowed), allowed)
    assert torch.equal(topk_mask(g, 1.0), torch.ones_like(allowed))
    assert int(topk_mask(g, 1e-6).sum()) == 1
    assert kept_count(0, 0.5) == 0 and kept_count(10, 0.04) == 1 and kept_count(10, 0.26) == 3


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan"), True, "0.5"])
def test_density_outside_the_unit_interval_is_refused(bad):
    with pytest.raises(ValueError, match=r"Expected `density` in \(0, 1\], got density="):
        topk_mask(torch.ones(4), bad)
