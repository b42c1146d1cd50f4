"""MaskGroup: a technique's per-step mask work on all its layers in fused ops."""

import pytest
import torch
from torch import nn

from lit_eff.flops import get_density
from lit_eff.sparsity import MaskGroup, attach_mask, get_mask, nm_mask


def _layers():
    torch.manual_seed(0)
    return {"a": nn.Linear(8, 4), "b": nn.Linear(16, 8).double()}  # two dtypes: one fused call each


def test_set_masks_copies_into_the_buffers_and_reports_density():
    layers = _layers()
    attach_mask(layers["a"])
    attach_mask(layers["b"], ste=False)
    group = MaskGroup(layers)
    buffers = [p.mask for p in group.params]
    masks = group.nm_masks(1, 4)
    assert all(torch.equal(mk, nm_mask(w, 1, 4)) for mk, w in zip(masks, group.weights))
    group.set_masks(masks, density=0.25)
    assert [p.mask for p in group.params] == buffers  # the same buffers (state_dict entries)
    assert all(torch.equal(get_mask(layer), mk) for layer, mk in zip(layers.values(), masks))
    assert get_density(layers["a"]) == get_density(layers["b"]) == 0.25
    assert all(torch.equal(layer.weight, layer.parametrizations.weight.original * mk)
               for layer, mk in zip(layers.values(), masks))  # forward reads the masked weight
    with pytest.raises(ValueError, match=r"Expected a bool mask of shape \(4, 8\) for layer `a`"):
        group.set_masks([masks[0].float(), masks[1]])


def test_gradients_and_optimizer_state_masked_for_every_layer():
    layers = _layers()
    for layer in layers.values():
        attach_mask(layer, mask=nm_mask(layer.weight, 2, 4))  # straight-through: dense gradients
    group = MaskGroup(layers)
    model = nn.ModuleList(layers.values())
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    for layer in layers.values():
        layer(torch.randn(3, layer.in_features, dtype=layer.weight.dtype)).sum().backward()
    optimizer.step()  # unmasked gradients: pruned positions move, state fills
    for layer in layers.values():
        layer(torch.randn(3, layer.in_features, dtype=layer.weight.dtype)).sum().backward()
    group.mask_gradients()
    assert all((w.grad[~p.mask] == 0).all() and (w.grad[p.mask] != 0).any() for w, p in zip(group.weights, group.params))
    group.zero_pruned([optimizer])
    for w, p in zip(group.weights, group.params):
        assert (w[~p.mask] == 0).all()
        assert all((v[~p.mask] == 0).all() for v in optimizer.state[w].values() if v.shape == w.shape)
    # masked gradients keep pruned positions at exactly 0 through further AdamW steps
    optimizer.step()
    assert all((w[~p.mask] == 0).all() for w, p in zip(group.weights, group.params))


def test_every_layer_needs_a_mask():
    with pytest.raises(ValueError, match=r"carry a lit_eff mask, got none on \['a', 'b'\]"):
        MaskGroup(_layers())


def test_dense_values_let_gradients_through_without_changing_the_forward_value():
    layers = _layers()
    for layer in layers.values():
        attach_mask(layer, mask=nm_mask(layer.weight, 1, 4), ste=False)
    group = MaskGroup(layers)
    group.zero_pruned()  # W is zero where pruned: RigL's invariant
    x = {n: torch.randn(3, layer.in_features, dtype=layer.weight.dtype) for n, layer in layers.items()}
    masked = {n: layer(x[n]).detach() for n, layer in layers.items()}
    group.dense_values(True)
    for name, layer in layers.items():
        out = layer(x[name])
        assert torch.equal(out, masked[name]), name  # the same value
        out.sum().backward()
    assert all((w.grad[~p.mask] != 0).any() for w, p in zip(group.weights, group.params))  # dense gradients
    group.dense_values(False)
    assert all(torch.equal(p.kept_minus_one, p.mask.to(p.kept_minus_one.dtype) - 1) for p in group.params)


def test_finite_flags_name_the_layers_holding_nan_or_inf():
    layers = {**_layers(), "c": nn.Linear(4, 4)}
    for layer in layers.values():
        attach_mask(layer)
    group = MaskGroup(layers)
    assert group.finite().tolist() == [True, True, True]
    with torch.no_grad():
        group.weights[1][0, 3] = float("nan")
        group.weights[2][1, 1] = float("inf")
    assert group.finite().tolist() == [True, False, False]
    assert [group.all_finite(i) for i in range(3)] == [True, False, False]
    with torch.no_grad():
        group.weights[1][0, 3] = group.weights[2][1, 1] = 3e19  # float32 "c": the fast check overflows, the exact one does not
    assert group.finite().tolist() == [True, True, False] and all(group.all_finite(i) for i in range(3))


def test_parameters_are_looked_up_when_used_not_kept():
    """A parameter replaced after the group is built (as fully_shard does) is the one edited."""
    layer = nn.Linear(8, 4)
    attach_mask(layer, mask=nm_mask(layer.weight, 2, 4), ste=False)
    group = MaskGroup({"a": layer})
    replacement = nn.Parameter(torch.randn(4, 8))
    layer.parametrizations.weight.original = replacement
    group.zero_pruned()
    assert group.weights[0] is replacement and (replacement[~group.params[0].mask] == 0).all()
