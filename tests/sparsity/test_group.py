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
