"""The masking mechanism: masked forward, straight-through gradients, beta, state dicts, export."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_eff.flops import get_density
from lit_eff.sparsity import (
    Mask,
    attach_mask,
    export,
    find_targets,
    get_mask,
    get_parametrization,
    harden_state_dict,
    has_mask,
    masked_modules,
    nm_mask,
    random_mask,
    remove_mask,
    set_beta,
    set_mask,
)
from tests.helpers import tiny_gpt, tiny_vit


def _layer(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(16, 6)


def _mask_all(model: nn.Module, n: int = 2, m: int = 4) -> dict[str, nn.Module]:
    targets = find_targets(model)
    for name, layer in targets.items():
        attach_mask(layer, mask=nm_mask(layer.weight, n, m, name=name), density=n / m)
    return targets


def test_forward_uses_the_masked_weight():
    layer = _layer()
    dense = layer.weight.detach().clone()
    mask = nm_mask(dense, 2, 4)
    param = attach_mask(layer, mask=mask)
    assert isinstance(param, Mask) and has_mask(layer) and torch.equal(get_mask(layer), mask)
    assert torch.equal(layer.weight, dense * mask)
    assert torch.equal(layer.parametrizations.weight.original, dense)  # the dense weight is kept
    x = torch.randn(3, 16)
    assert torch.equal(layer(x), F.linear(x, dense * mask, layer.bias))
    assert get_density(layer) == 0.5


def test_straight_through_gradient_reaches_pruned_weights():
    layer = _layer()
    mask = nm_mask(layer.weight, 1, 4)
    attach_mask(layer, mask=mask)
    x = torch.randn(5, 16)
    layer(x).pow(2).sum().backward()
    # reference: the gradient with respect to the effective weight, taken as a leaf
    effective = (layer.weight.detach() * mask).requires_grad_(True)
    F.linear(x, effective, layer.bias.detach()).pow(2).sum().backward()
    grad = layer.parametrizations.weight.original.grad
    assert torch.allclose(grad, effective.grad)
    assert (grad[~mask] != 0).all()  # pruned positions receive their gradient


def test_ste_false_masks_the_gradient():
    layer = _layer()
    mask = nm_mask(layer.weight, 2, 4)
    attach_mask(layer, mask=mask, ste=False, beta=0.25)
    x = torch.randn(5, 16)
    layer(x).sum().backward()
    # d(sum(x W~^T))/dW~ = 1^T x; the plain gradient then scales it by E + beta (1 - E)
    expected = (torch.ones(5, 6).T @ x) * torch.where(mask, 1.0, 0.25)
    assert torch.allclose(layer.parametrizations.weight.original.grad, expected)


def test_beta_decay_forward_and_density():
    layer = _layer()
    dense = layer.weight.detach().clone()
    mask = nm_mask(dense, 1, 4)
    attach_mask(layer, mask=mask, density=0.25)
    assert get_density(layer) == 0.25
    set_beta(layer, 0.3)
    assert torch.allclose(layer.weight, dense * (mask + 0.3 * (~mask)))
    assert get_density(layer) == 1.0  # pruned weights still take part in the matmul
    x = torch.randn(2, 16)
    layer(x).sum().backward()  # STE: every weight gets the plain gradient, not scaled by beta
    assert torch.allclose(layer.parametrizations.weight.original.grad, torch.ones(2, 6).T @ x)
    set_beta(layer, 0.0)
    assert torch.equal(layer.weight, dense * mask) and get_density(layer) == 0.25


def test_set_mask_copies_in_place():
    layer = _layer()
    attach_mask(layer)
    assert get_mask(layer).all() and get_density(layer) == 1.0
    buffer = get_mask(layer)
    pointer = buffer.data_ptr()
    new = random_mask(layer.weight.shape, 0.25, torch.Generator().manual_seed(0))
    set_mask(layer, new.float())  # 0/1 floats are accepted
    assert get_mask(layer) is buffer and buffer.data_ptr() == pointer and torch.equal(buffer, new)
    assert layer.state_dict()["parametrizations.weight.0.mask"].data_ptr() == pointer
    assert get_density(layer) == pytest.approx(0.25, abs=1 / 96)


def test_mask_travels_with_to_and_state_dict_keys():
    layer = _layer()
    attach_mask(layer, mask=nm_mask(layer.weight, 2, 4), beta=0.5)
    assert sorted(layer.state_dict()) == ["bias", "parametrizations.weight.0.beta", "parametrizations.weight.0.mask",
                                          "parametrizations.weight.original"]
    # kept_minus_one (the mask as numbers, for fused multiplies) moves and casts with the module
    # but stays out of the checkpoint
    assert sorted(name for name, _ in layer.named_buffers()) == ["parametrizations.weight.0.beta",
                                                                 "parametrizations.weight.0.kept_minus_one",
                                                                 "parametrizations.weight.0.mask"]
    layer.to(torch.float64)
    assert layer.weight.dtype == torch.float64 and get_mask(layer).dtype == torch.bool
    assert get_parametrization(layer).kept_minus_one.dtype == torch.float64
    assert layer(torch.randn(2, 16, dtype=torch.float64)).dtype == torch.float64


def test_state_dict_round_trip_into_a_fresh_masked_model():
    torch.manual_seed(0)
    source = tiny_gpt().model
    _mask_all(source)
    first = next(iter(masked_modules(source).values()))
    set_beta(first, 0.4)
    set_mask(first, random_mask(first.weight.shape, 0.3, torch.Generator().manual_seed(3)))
    with torch.no_grad():  # the dense weights move away from their init
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    state = source.state_dict()

    torch.manual_seed(1)
    resumed = tiny_gpt().model
    for layer in find_targets(resumed).values():
        attach_mask(layer)  # dense masks, as a callback's setup() would attach before a restore
    resumed.load_state_dict(state)  # strict
    for (name, a), (_, b) in zip(source.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    idx = torch.randint(0, 256, (2, 16))
    assert torch.equal(source(idx), resumed(idx))
    for name, layer in masked_modules(resumed).items():  # reported densities follow the loaded masks
        assert get_density(layer) == pytest.approx(get_density(masked_modules(source)[name]))
    assert get_density(masked_modules(resumed)["blocks.0.attn.qkv"]) == 1.0  # beta > 0 there
    assert get_density(masked_modules(resumed)["blocks.1.mlp.fc2"]) == 0.5


def test_export_gives_the_plain_model():
    torch.manual_seed(0)
    plain_keys = list(tiny_vit().model.state_dict())
    model = tiny_vit().model.eval()
    targets = _mask_all(model, 1, 4)
    set_beta(targets["blocks.0.mlp.fc1"], 0.5)
    params = {name: layer.parametrizations.weight.original for name, layer in targets.items()}
    effective = {name: layer.weight.detach().clone() for name, layer in targets.items()}
    x = torch.randn(3, 1, 8, 8)
    before = model(x)
    assert export(model) is model
    assert torch.equal(model(x), before)
    assert list(model.state_dict()) == plain_keys
    assert not masked_modules(model)
    for name, layer in targets.items():
        assert type(layer) is nn.Linear and not has_mask(layer)
        assert layer.weight is params[name]  # optimizers holding the parameter keep working
        assert torch.equal(layer.weight, effective[name])
        assert get_density(layer) == 1.0 and not layer._load_state_dict_post_hooks
    assert (targets["blocks.1.mlp.fc2"].weight.reshape(-1, 4) != 0).sum(1).max() == 1


def test_harden_state_dict_loads_into_a_plain_model():
    torch.manual_seed(0)
    model = tiny_gpt().model
    targets = _mask_all(model)
    set_beta(targets["blocks.0.mlp.fc2"], 0.2)
    plain = tiny_gpt().model
    plain.load_state_dict(harden_state_dict(model.state_dict()))  # strict
    idx = torch.randint(0, 256, (2, 16))
    assert torch.equal(plain(idx), model(idx))
    top = _layer()
    attach_mask(top, mask=nm_mask(top.weight, 2, 4))
    assert sorted(harden_state_dict(top.state_dict())) == ["bias", "weight"]


def test_remove_mask_can_restore_the_dense_weight():
    layer = _layer()
    dense = layer.weight.detach().clone()
    attach_mask(layer, mask=nm_mask(dense, 2, 4))
    remove_mask(layer, harden=False)
    assert torch.equal(layer.weight, dense) and type(layer) is nn.Linear and get_density(layer) == 1.0
    attach_mask(layer)  # can be masked again
    assert has_mask(layer)


def test_masked_model_trains_with_an_optimizer_built_before_masking():
    layer = _layer()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    mask = nm_mask(layer.weight, 2, 4)
    attach_mask(layer, mask=mask)
    before = layer.parametrizations.weight.original.detach().clone()
    layer(torch.randn(4, 16)).sum().backward()
    optimizer.step()
    after = layer.parametrizations.weight.original.detach()
    assert (after[~mask] != before[~mask]).all()  # STE: pruned dense weights train too
    assert torch.equal(layer.weight[~mask], torch.zeros_like(after[~mask]))


@pytest.mark.parametrize("call,match", [
    (lambda l: attach_mask(l, mask=torch.ones(3, 3)), r"Expected a mask of shape \(6, 16\), got shape \(3, 3\)"),
    (lambda l: attach_mask(l, mask=torch.full((6, 16), 0.5)),
     r"Expected a binary mask \(bool, or only 0 and 1\), got other values; scale pruned weights with `beta`"),
    (lambda l: attach_mask(l, beta=1.5), r"Expected `beta` in \[0, 1\], got beta=1.5"),
    (lambda l: attach_mask(l, name="bias2"), r"Expected `bias2` to be a parameter of Linear, got NoneType"),
    (lambda l: get_mask(l), r"Linear has no lit_eff mask on `weight`; call attach_mask first"),
    (lambda l: set_mask(l, torch.ones(6, 16)), r"Linear has no lit_eff mask on `weight`"),
    (lambda l: set_beta(l, 0.5), r"Linear has no lit_eff mask on `weight`"),
    (lambda l: remove_mask(l), r"Linear has no lit_eff mask on `weight`"),
])
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call(_layer())


def test_errors_on_masked_or_parametrized_weights():
    layer = _layer()
    attach_mask(layer)
    with pytest.raises(ValueError, match=r"Linear.weight already has a lit_eff mask; a weight takes one sparsity"):
        attach_mask(layer)
    with pytest.raises(ValueError, match=r"Expected `beta` in \[0, 1\], got beta=-0.1"):
        set_beta(layer, -0.1)
    with pytest.raises(ValueError, match=r"Expected a mask of shape \(6, 16\), got shape \(16, 6\)"):
        set_mask(layer, torch.ones(16, 6))
    other = nn.utils.parametrizations.orthogonal(_layer())
    with pytest.raises(ValueError, match=r"Linear.weight is already parametrized by _Orthogonal; a lit_eff mask"):
        attach_mask(other)
    assert get_parametrization(other) is None


def test_flop_tracker_counts_masked_matmuls_at_their_density():
    from lit_eff.flops import FlopTracker

    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    attach_mask(model[0], mask=nm_mask(model[0].weight, 2, 4), density=0.5)
    tracker = FlopTracker()
    with tracker:
        model(torch.randn(3, 16)).sum().backward()
    first = 3 * (2 * 16 * 8) * 2   # forward and weight grad (the input needs no grad)
    second = 3 * (2 * 8 * 4) * 3   # forward, input grad and weight grad
    assert tracker.executed == first + second
    assert tracker.effective == 0.5 * first + second
    export(model)
    assert get_density(model[0]) == 1.0


@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_straight_through_value_is_exact_and_gradient_reaches_all_weights(beta):
    torch.manual_seed(0)
    layer = _layer()
    mask = nm_mask(layer.weight, 2, 4)
    attach_mask(layer, mask=mask, beta=beta)
    dense = layer.parametrizations.weight.original
    # bit-exact masked value, not just close
    assert torch.equal(layer.weight, torch.where(mask, dense, dense * beta))
    x = torch.randn(5, 16)
    layer(x).pow(2).sum().backward()
    effective = torch.where(mask, dense, dense * beta).detach().requires_grad_()
    torch.nn.functional.linear(x, effective, layer.bias).pow(2).sum().backward()
    assert torch.equal(dense.grad, effective.grad)  # straight through: d/dW = d/d(effective)


def test_all_ones_mask_costs_no_masking_work_until_something_is_pruned():
    layer = _layer()
    param = attach_mask(layer, density=1.0)  # dense (a warm-up, or a released SPDF mask)
    dense = layer.parametrizations.weight.original
    assert layer.weight is dense and param.mode == "identity"
    mask = nm_mask(dense, 2, 4)
    set_mask(layer, mask)  # counted: 0.5
    assert param.mode == "binary" and torch.equal(layer.weight, dense * mask)
    set_beta(layer, 0.4)
    assert param.mode == "scaled" and torch.equal(layer.weight, torch.where(mask, dense, dense * 0.4))
    set_beta(layer, 0.0)
    set_mask(layer, torch.ones_like(mask))  # counted: all kept again
    assert layer.weight is dense and param.mode == "identity"
    # a Mask built directly from a sparse mask masks from the start
    assert Mask(mask)._density == 0.5 and Mask(mask).mode == "binary"


def test_compiled_forward_recompiles_only_when_the_mode_changes():
    """New masks and new beta values reach the compiled graph through buffers; only the mode
    (all ones / binary / scaled) is specialized on."""
    torch.manual_seed(0)
    layer = _layer()
    param = attach_mask(layer, mask=nm_mask(layer.weight, 2, 4), beta=0.9)
    compiled = torch.compile(layer, backend="eager")
    x = torch.randn(3, 16)
    torch._dynamo.reset()
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    try:
        for beta in (0.9, 0.7, 0.5, 0.25):  # mask decay: a new beta every step
            set_beta(layer, beta)
            dense = layer.parametrizations.weight.original
            expected = torch.nn.functional.linear(x, torch.where(param.mask, dense, dense * beta), layer.bias)
            torch.testing.assert_close(compiled(x), expected, rtol=0, atol=1e-6)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == 1
        for mask in (nm_mask(layer.weight, 1, 4), nm_mask(-layer.weight, 2, 4)):  # new masks
            set_mask(layer, mask)
            compiled(x)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == 1
        set_beta(layer, 0.0)  # scaled -> binary: the one thing that compiles again
        compiled(x)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == 2
    finally:
        torch._dynamo.reset()
