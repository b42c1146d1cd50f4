"""How token techniques attach: copies (EMA, SWA) compute with their own weights, pickling, a clean
detach, torch.compile without graph breaks or per-step recompiles, and the three forms of
activation checkpointing."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    apply_activation_checkpointing,
    checkpoint_wrapper,
)

from lit_eff.models.naming import clean_name
from lit_eff.tokens import attach_drop, attach_merge, attach_skip, find_adapter
from tests.helpers import tiny_gpt, tiny_vit


def _vit():
    torch.manual_seed(0)
    return tiny_vit().model.train()


def _gpt():
    torch.manual_seed(0)
    return tiny_gpt().model.train()


def _images(seed=1):
    return torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def _text(seed=1):
    return torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(seed))


# name: (model, input, attach, draw the random choice of a batch)
CASES = {
    "drop-attn": (_vit, _images, lambda m: attach_drop(m, [1], [0.5], score="attn"), None),
    "drop-random": (_vit, _images, lambda m: attach_drop(m, [0, 1], [0.5, 0.25], score="random"),
                    lambda t, keys: t.draw(keys, batch=3)),
    "merge": (_vit, _images, lambda m: attach_merge(m, r=4, mode="both"), None),
    "skip-ltd": (_gpt, _text, lambda m: attach_skip(m, [1], "ltd", keep=0.5),
                 lambda t, keys: t.draw(keys, batch=2, tokens=[32, 32])),
    "skip-mod": (_gpt, _text, lambda m: attach_skip(m, [0, 1], "mod", capacity=0.25), None),
}


def _attach(case, model, keys=(0, 1, 0)):
    _, _, attach, draw = CASES[case]
    torch.manual_seed(5)  # Mixture-of-Depths routers start the same
    technique = attach(model)
    if draw is not None:
        draw(technique, keys)
    return technique


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_deep_copy_computes_with_its_own_weights(case):
    make, data, _, _ = CASES[case]
    model, x = make(), data()
    plain = copy.deepcopy(model)
    _attach(case, model)
    keys = model.state_dict().keys()
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    fresh_technique = _attach(case, plain)  # a fresh attach on a model holding the copy's weights
    plain.load_state_dict(copied.state_dict())
    assert copied.state_dict().keys() == keys
    out = copied(x)
    assert torch.allclose(out, plain(x), atol=1e-6)
    assert not torch.allclose(out, model(x), atol=1e-3)
    fresh_technique.remove(**({"keep_routers": False} if case == "skip-mod" else {}))
    if case != "skip-mod":  # attaching adds no state: the keys are those of the plain model
        assert plain.state_dict().keys() == keys


@pytest.mark.parametrize("case", sorted(CASES))
def test_pickling_keeps_the_technique_and_detach_restores_the_classes(case):
    make, data, _, _ = CASES[case]
    model, x = make(), data()
    classes = [type(b) for b in find_adapter(model).blocks]
    plain = copy.deepcopy(model)
    technique = _attach(case, model)
    out = model(x)
    assert torch.allclose(pickle.loads(pickle.dumps(model))(x), out, atol=1e-6)
    technique.remove()
    assert [type(b) for b in find_adapter(model).blocks] == classes
    assert all("_token_" not in name for b in find_adapter(model).blocks for name in vars(b))
    if case != "skip-mod":  # the routers stay: trained weights
        assert torch.allclose(model(x), plain(x), atol=1e-6)


def _loss_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.float().pow(2).mean().backward()
    return out.detach(), {clean_name(n): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", sorted(CASES))
def test_compiled_without_graph_breaks_equals_eager_and_new_draws_do_not_recompile(case):
    make, data, _, draw = CASES[case]
    model, x = make(), data()
    technique = _attach(case, model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break raises
    for step in range(3):
        if draw is not None:
            draw(technique, (0, step, 0))
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        out, grads = _loss_and_grads(compiled, x)
        if step:
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs, f"recompiled at step {step}"
        reference, reference_grads = _loss_and_grads(model, x)
        assert torch.allclose(out, reference, atol=1e-5)
        assert grads.keys() == reference_grads.keys()
        assert all(torch.allclose(grads[k], reference_grads[k], atol=1e-5) for k in grads)
    torch._dynamo.reset()


def test_a_new_keep_count_compiles_once_and_then_not_again():
    model, x = _vit(), _images()
    dropper = attach_drop(model, [1], [0.5], score="norm")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    built = []
    for ratio in (0.5, 0.5, 0.25, 0.25, 0.5):
        dropper.set_ratios([ratio], 16)
        before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        compiled(x)
        built.append(torch._dynamo.utils.counters["stats"]["unique_graphs"] - before)
    assert built == [1, 0, 1, 0, 0]
    torch._dynamo.reset()


def test_a_growing_ltd_keep_compiles_twice_then_runs_dynamic():
    """The kept count changes: one compile at the first change (the size becomes dynamic), one when
    every token is kept again (nothing to gather)."""
    model, x = _gpt(), _text()
    skipper = attach_skip(model, [1], "ltd", keep=0.5)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    built = []
    for step, keep in enumerate([0.5, 0.5, 0.625, 0.625, 0.75, 0.875, 1.0, 1.0]):
        skipper.keep = keep
        skipper.draw((0, step, 0), batch=2, tokens=[32, 32])
        before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        compiled(x)
        built.append(torch._dynamo.utils.counters["stats"]["unique_graphs"] - before)
    assert built == [1, 0, 1, 0, 0, 0, 1, 0]
    torch._dynamo.reset()


def _checkpointed(model, form: str, attach):
    blocks = set(find_adapter(model).blocks)
    if form == "model":  # timm's or the GPT's own set_grad_checkpointing
        model.set_grad_checkpointing(True)
    if form == "wrapper-after":  # what a LightningModule's configure_model does after the callbacks' setup
        technique = attach(model)
    apply = form.startswith("wrapper")
    if apply:
        apply_activation_checkpointing(model, checkpoint_wrapper_fn=checkpoint_wrapper, check_fn=lambda m: m in blocks)
    if form != "wrapper-after":
        technique = attach(model)
    return technique


@pytest.mark.parametrize("form", ["model", "wrapper-before", "wrapper-after"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_activation_checkpointing_recomputes_and_changes_nothing(case, form):
    make, data, _, _ = CASES[case]
    plain, x = make(), data()
    model = copy.deepcopy(plain)
    _attach(case, plain)
    reference, reference_grads = _loss_and_grads(plain, x)
    technique = _checkpointed(model, form, lambda m: _attach(case, m))
    calls = []
    for block in find_adapter(model).blocks:
        block.mlp.register_forward_pre_hook(lambda *args: calls.append(1))
    out, grads = _loss_and_grads(model, x)
    assert len(calls) == 2 * len(find_adapter(model).blocks)  # every block ran again in backward
    assert torch.allclose(out, reference, atol=1e-6)
    clean = {k.replace("._checkpoint_wrapped_module", ""): v for k, v in grads.items()}
    assert clean.keys() == reference_grads.keys()
    assert all(torch.allclose(clean[k], reference_grads[k], atol=1e-6) for k in reference_grads)
    technique.remove()
