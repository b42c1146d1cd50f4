import pytest
import torch

from lit_eff.supernet import SearchSpace, SubnetConfig

SPACE = {"embed_dim": [32, 48, 64], "depth": [2, 3], "num_heads": [2, 4], "mlp_ratio": [1.0, 2.0]}


def space(**changes):
    return SearchSpace.from_dict({**SPACE, **changes})


def test_space_basics():
    s = space()
    assert s.head_dim == 16
    assert s.max() == SubnetConfig(64, 3, (4, 4, 4), (2.0, 2.0, 2.0))
    assert s.min() == SubnetConfig(32, 2, (2, 2), (1.0, 1.0))
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        s.check(s.sample(gen))
    assert space(depth={"min": 1, "max": 3}).depth == [1, 2, 3]
    assert space(mlp_ratio={"min": 1.0, "max": 2.0, "step": 0.5}).mlp_ratio == [1.0, 1.5, 2.0]
    cfg = s.sample(gen)
    assert SubnetConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("changes, match", [
    ({"depth": []}, r"Expected `depth` to be a non-empty list of choices, got depth=\[\]"),
    ({"embed_dim": [64, 32]}, r"Expected `embed_dim` to be strictly increasing, got embed_dim=\[64, 32\]"),
    ({"num_heads": [2, 2]}, r"Expected `num_heads` to be strictly increasing"),
    ({"depth": {"min": 4, "max": 2}}, r"Expected `depth.min` <= `depth.max`, got min=4, max=2"),
    ({"num_heads": [2, 3, 5]}, r"Expected the largest `num_heads` to divide the largest `embed_dim`.*embed_dim=64, num_heads=5"),
    ({"depth": [0, 2]}, r"Expected `depth` to hold positive numbers"),
    ({"depth": [1.5, 2]}, r"Expected `depth` to hold integers"),
])
def test_bad_space(changes, match):
    with pytest.raises(ValueError, match=match):
        space(**changes)


def test_bad_keys_and_configs():
    with pytest.raises(ValueError, match=r"Expected `space` with keys .*missing \['mlp_ratio'\]"):
        SearchSpace.from_dict({k: v for k, v in SPACE.items() if k != "mlp_ratio"})
    with pytest.raises(ValueError, match=r"Expected `num_heads` and `mlp_ratio` to have `depth`=2 entries"):
        SubnetConfig(32, 2, (2,), (1.0, 1.0))
    with pytest.raises(ValueError, match=r"Expected a subnet inside the search space.*embed_dim=40 not in \[32, 48, 64\]"):
        space().check(SubnetConfig(40, 2, (2, 2), (1.0, 1.0)))
