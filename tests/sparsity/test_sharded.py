"""Masks beside FSDP2 shards (one CPU process, gloo): every MaskGroup edit and Mask's forward
outside FSDP's own forward work on DTensor weights, gradients and optimizer state. The
two-process equality with DDP is the contract's fsdp2 column."""


import pytest
import torch
import torch.distributed as dist
from torch import nn

from lit_eff import sparsity
from lit_eff.sparsity.sharded import full, is_sharded


@pytest.fixture
def process_group(tmp_path):
    """A one-process gloo group over a file store: no port to collide with other tests."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_masks_work_on_fsdp2_shards(process_group):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    layers = {"0": model[0], "2": model[2]}
    for layer in layers.values():
        sparsity.attach_mask(layer, ste=False, density=1.0)
    group = sparsity.MaskGroup(layers)  # built before sharding, as in a callback's setup
    fully_shard(model[0])
    fully_shard(model)
    assert all(is_sharded(w) for w in group.weights)
    masks = group.nm_masks(2, 4)
    assert torch.equal(masks[0], sparsity.nm_mask(full(group.weights[0]), 2, 4))
    group.set_masks(masks, density=0.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 8)).sum().backward()
    assert all(is_sharded(w.grad) for w in group.weights)
    grads = [full(w.grad).clone() for w in group.weights]
    assert all((g[~p.mask] == 0).all() and (g[p.mask] != 0).any() for g, p in zip(grads, group.params))
    group.add_pruned_weights_to_grad(0.5)  # the SR-STE term, shard by shard
    for w, g, p in zip(group.weights, grads, group.params):
        torch.testing.assert_close(full(w.grad), g + 0.5 * (~p.mask) * full(w).detach(), rtol=0, atol=1e-7)
    group.mask_gradients()
    for w, g in zip(group.weights, grads):
        torch.testing.assert_close(full(w.grad), g, rtol=0, atol=1e-7)
    optimizer.step()
    group.zero_pruned([optimizer])
    for w, p in zip(group.weights, group.params):
        assert (full(w)[~p.mask] == 0).all()
        assert all((full(v)[~p.mask] == 0).all() for v in optimizer.state[w].values() if v.shape == w.shape)
    # module.weight outside FSDP's forward is the sharded effective weight
    effective = model[0].weight
    assert is_sharded(effective) and torch.equal(full(effective), full(group.weights[0]) * group.params[0].mask)
    assert torch.equal(sparsity.effective_weight(model[0]), full(effective))
    assert group.finite().tolist() == [True, True] and group.all_finite(0) and group.all_finite(1)
