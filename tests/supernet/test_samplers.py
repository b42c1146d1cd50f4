import pytest

from lit_eff.supernet import (ComplexityAware, DelayedShrinking, ElasticViT, PerformanceAware, Sandwich,
                              SubnetFlops, Uniform)
from tests.supernet.common import TINY_SPACE

SPACE = {"embed_dim": [32, 48, 64], "depth": [2, 3, 4], "num_heads": [2, 3, 4], "mlp_ratio": [1.0, 1.5, 2.0]}


def bound(sampler, space=SPACE, total=100):
    model = ElasticViT(space)
    sampler.bind(model.space, SubnetFlops(model), total)
    return sampler


def configs(draws):
    return [(d.config, d.role, d.weight) for d in draws]


def test_sandwich_and_rank_consistency():
    a, b = bound(Sandwich(k=2)), bound(Sandwich(k=2))
    for step in range(5):
        draws = a.sample(step)
        assert [d.role for d in draws] == ["max", "student", "student", "student"]
        assert draws[0].config == a.space.max() and draws[1].config == a.space.min()
        assert configs(draws) == configs(b.sample(step))  # another process, same decisions
    assert configs(a.sample(1)) != configs(a.sample(2))


def test_complexity_aware_moves_at_most_one_bucket_and_covers_all():
    sampler = bound(ComplexityAware(num_buckets=4, k=2))
    buckets, hits = [], 0
    for step in range(120):
        draws = sampler.sample(step)
        assert sampler.sample(step) is draws  # micro-batches of one step share the draw
        buckets.append(sampler.bucket)
        lo, hi = sampler.edges[sampler.bucket], sampler.edges[sampler.bucket + 1]
        hits += sum(lo <= sampler.flops(d.config) <= hi for d in draws[2:])
    assert max(abs(a - b) for a, b in zip(buckets, buckets[1:])) <= 1
    assert set(buckets) == {0, 1, 2, 3}
    assert hits >= 0.9 * 2 * 120  # the random subnets come from the current bucket
    assert sampler.edges[0] == sampler.flops.min() and sampler.edges[-1] == sampler.flops.max()


def test_performance_aware_banks_and_wide_shallow():
    sampler = bound(PerformanceAware(num_buckets=3, k=2, q=0.5, capacity=4))
    exploited = 0
    for step in range(60):
        draws = sampler.sample(step)
        exploited += sum(not d.explored for d in draws[2:])
        sampler.observe(step, draws, [float(sampler.flops(d.config)) * 1e-7 for d in draws])
    assert all(0 < len(bank) <= 4 for bank in sampler.banks)
    assert exploited > 0
    for b, bank in enumerate(sampler.banks):
        assert all(sampler.bucket_of(cfg) == b for cfg, _ in bank)
    # explore prefers wide and shallow: the chosen candidate scores lowest
    anchor = sampler.space.min()
    deep_narrow = sampler.space.max().__class__(32, 4, (2,) * 4, (1.0,) * 4)
    wide_shallow = sampler.space.max().__class__(64, 2, (4,) * 2, (2.0,) * 2)
    assert sampler.shallow_wide_score(wide_shallow, anchor) < sampler.shallow_wide_score(deep_narrow, anchor)
    state = sampler.state_dict()
    other = bound(PerformanceAware(num_buckets=3, k=2, q=0.5, capacity=4))
    other.load_state_dict(state)
    assert other.banks == sampler.banks and other.bucket == sampler.bucket
    assert configs(other.sample(60)) == configs(sampler.sample(60))


def test_delayed_shrinking_phases():
    sampler = bound(DelayedShrinking(start_fraction=0.5, warmup_fraction=0.1, k=2), total=100)
    assert configs(sampler.sample(49)) == [(sampler.space.max(), "max", 1.0)]
    weights = [[d.weight for d in sampler.sample(s)] for s in (50, 55, 60, 90)]
    assert [len(w) for w in weights] == [4, 4, 4, 4]
    assert weights[0][1] == pytest.approx(1 / 11) and weights[1][1] == pytest.approx(6 / 11)
    assert weights[2][1:] == weights[3][1:] == [1.0, 1.0, 1.0]


def test_uniform_has_no_teacher():
    sampler = bound(Uniform(k=3), space=TINY_SPACE)
    assert [d.role for d in sampler.sample(0)] == ["student"] * 3


@pytest.mark.parametrize("make, match", [
    (lambda: Sandwich(k=-1), r"Expected `k` to be an integer >= 0, got k=-1"),
    (lambda: Uniform(k=0), r"Expected `k` >= 1 or `include_max`=True"),
    (lambda: ComplexityAware(num_buckets=0), r"Expected `num_buckets` to be an integer >= 1, got num_buckets=0"),
    (lambda: PerformanceAware(q=1.5), r"Expected `q` in \[0, 1\], got q=1.5"),
    (lambda: PerformanceAware(capacity=0), r"Expected `capacity` to be an integer >= 1"),
    (lambda: DelayedShrinking(start_fraction=1.0), r"Expected `start_fraction` in \[0, 1\), got start_fraction=1.0"),
    (lambda: DelayedShrinking(start_fraction=0.9, warmup_fraction=0.2), r"Expected `warmup_fraction` in \[0, 1 - start_fraction\]"),
])
def test_bad_sampler_args(make, match):
    with pytest.raises(ValueError, match=match):
        make()
