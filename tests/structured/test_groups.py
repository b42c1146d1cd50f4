"""Prunable groups: discovery, Torch-Pruning group-norm importance, physical removal that
computes what masking the removed members computes, re-expansion (live and from a state dict),
the FLOPs cost model against the real count, soft-mask gates."""

from __future__ import annotations

import pytest
import torch
from timm.models.resnet import Bottleneck, ResNet
from torch import nn

from lit_eff.flops import count_flops
from lit_eff.structured import attach_gates, detach_gates, find_groups, probe, soft_mask, uniform_ratio
from lit_eff.structured.prune import expand_state_dict, keep_above_half, keep_top, layouts
from tests.helpers import tiny_cnn, tiny_gpt, tiny_vit


def tiny_bottleneck() -> nn.Module:
    return ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10, in_chans=1, base_width=16)


CASES = {
    "vit": (lambda: tiny_vit().model, lambda: torch.randn(3, 1, 8, 8)),
    "gpt": (lambda: tiny_gpt().model, lambda: torch.randint(0, 256, (2, 16))),
    "resnet": (lambda: tiny_cnn().model, lambda: torch.randn(3, 1, 16, 16)),
    "bottleneck": (tiny_bottleneck, lambda: torch.randn(3, 1, 16, 16)),
}


def test_discovery_names_heads_units_and_channels():
    assert [g.name for g in find_groups(tiny_vit().model)] == [
        "blocks.0.attn.heads", "blocks.0.mlp.fc1", "blocks.1.attn.heads", "blocks.1.mlp.fc1"]
    assert [g.name for g in find_groups(tiny_gpt().model, ["mlp"])] == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]
    assert [g.name for g in find_groups(tiny_bottleneck(), include=["layer1.*"])] == [
        "layer1.0.conv1", "layer1.0.conv2"]
    with pytest.raises(ValueError, match=r"No prunable structures of Sequential .*found in this model: none"):
        find_groups(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match=r"include=\['nothing'\].*found in this model: blocks.0.attn.heads"):
        find_groups(tiny_vit().model, include=["nothing"])


def test_importance_is_torch_pruning_group_norm():
    """GroupNormImportance(p, group_reduction="mean", normalizer=None): each member's Σ|w|^p
    over every slice it owns, averaged over the slices (heads: averaged over head_dim)."""
    torch.manual_seed(0)
    model = tiny_vit().model
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    heads, units = find_groups(model)[:2]
    for p in (1, 2):
        w1, w2 = mlp.fc1.weight.detach(), mlp.fc2.weight.detach()
        expected = torch.stack([(w1[j].abs() ** p).sum() + (w2[:, j].abs() ** p).sum() for j in range(64)]) / 2
        assert torch.allclose(units.importance(p), expected)
        qkv, proj, d = attn.qkv.weight.detach(), attn.proj.weight.detach(), attn.head_dim
        per_channel = torch.stack([sum((qkv[w * 32 + c].abs() ** p).sum() for w in range(3))
                                   + (proj[:, c].abs() ** p).sum() for c in range(32)]) / 4
        assert torch.allclose(heads.importance(p), per_channel.reshape(2, d).mean(1))


def _zero_removed(model_factory, keep):
    """The dense model with the removed members' outgoing weights zeroed (what removal must equal)."""
    torch.manual_seed(0)
    model = model_factory()
    with torch.no_grad():
        for group in find_groups(model):
            removed = torch.ones(group.dense, dtype=torch.bool)
            removed[keep[group.name]] = False
            group.scale((~removed).float())
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_removal_computes_what_masking_computes_and_expands_back(case):
    make_model, make_input = CASES[case]
    x = make_input()
    torch.manual_seed(0)
    model = make_model().eval()
    groups = find_groups(model)
    gen = torch.Generator().manual_seed(3)
    keep = {g.name: torch.sort(torch.randperm(g.dense, generator=gen)[: max(1, g.dense // 3)]).values for g in groups}
    names = {m: name + "." if name else "" for name, m in model.named_modules()}
    for group in groups:
        group.keep(keep[group.name])
    masked = _zero_removed(make_model, keep).eval()
    with torch.no_grad():
        out, reference = model(x), masked(x)
    assert torch.allclose(out, reference, atol=1e-5)
    shrunk = {k: v.clone() for k, v in model.state_dict().items()}
    recorded = layouts(groups, names)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in masked.parameters())
    for group in groups:
        group.expand()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in masked.state_dict().items()}
    with torch.no_grad():
        assert torch.allclose(model(x), reference, atol=1e-5)
    expanded = expand_state_dict(shrunk, recorded)
    assert all(torch.equal(expanded[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("case", sorted(CASES))
def test_cost_model_equals_the_counted_flops(case):
    make_model, make_input = CASES[case]
    x = make_input()
    model = make_model()
    groups = find_groups(model)
    cost = probe(model, x, groups)
    dense = count_flops(lambda: model(x), backward=False).forward
    assert cost.dense == dense
    gen = torch.Generator().manual_seed(4)
    for group in groups:
        group.keep(torch.sort(torch.randperm(group.dense, generator=gen)[: max(1, group.dense // 2 - 1)]).values)
    pruned = count_flops(lambda: model(x), backward=False).forward
    assert cost.ratio([g.count / g.dense for g in groups]) == pytest.approx(pruned / dense, rel=1e-12)


def test_uniform_ratio_meets_the_target_from_below():
    model, x = tiny_vit().model, torch.randn(2, 1, 8, 8)
    groups = find_groups(model)
    cost = probe(model, x, groups)
    rho = uniform_ratio(cost, 0.6, groups)
    kept = [max(1, round(g.dense * (1 - rho))) / g.dense for g in groups]
    assert cost.ratio(kept) <= 0.6 < cost.ratio([max(1, round(g.dense * (1 - rho + 0.02))) / g.dense for g in groups])


def test_keep_rules():
    assert keep_above_half(torch.tensor([0.9, 0.2, 0.5, 0.1])).tolist() == [0, 2]
    assert keep_above_half(torch.tensor([0.3, 0.2, 0.4]), min_keep=2).tolist() == [0, 2]
    assert keep_top(torch.tensor([3.0, 1.0, 2.0, 5.0]), 2).tolist() == [0, 3]


def test_gates_multiply_activations_by_the_soft_mask_and_leave_no_trace():
    torch.manual_seed(0)
    model = tiny_vit().model.eval()
    x = torch.randn(2, 1, 8, 8)
    groups = find_groups(model)
    modes = {g.name: "l1" for g in groups}
    handles = attach_gates(groups, modes, scale=2.0, temperature=0.1)
    mlp_units = groups[1]
    with torch.no_grad():
        mlp_units.owner.prune_gate.theta.fill_(0.3)
    s = mlp_units.importance(1)
    expected = torch.sigmoid((s / s.max() - 0.6) / 0.1)
    assert torch.allclose(soft_mask(mlp_units, "l1"), expected)
    with torch.no_grad():
        gated = model(x)
        for group in groups:
            group.scale(soft_mask(group, "l1"))  # folding the masks gives the same function
    detach_gates(groups, handles)
    assert not any("prune_gate" in name for name, _ in model.named_parameters())
    with torch.no_grad():
        assert torch.allclose(model(x), gated, atol=1e-5)
