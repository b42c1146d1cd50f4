"""Token skipping: pass-through, order, causality on the GPT (training and generate())."""

from __future__ import annotations

import torch

from lit_eff.models.gpt import Block
from lit_eff.tokens import attach_skip
from lit_eff.tokens.skip import ROUTER_NAME
from tests.helpers import tiny_gpt, tiny_vit


def _gpt():
    torch.manual_seed(0)
    return tiny_gpt()


def _future_changed(idx: torch.Tensor, t: int) -> torch.Tensor:
    other = idx.clone()
    other[:, t + 1 :] = (other[:, t + 1 :] + 17) % 256
    return other


def test_ltd_skipped_tokens_pass_through_unchanged_and_kept_ones_run_in_order():
    gpt = _gpt().model.train()
    block = gpt.blocks[1]
    skipper = attach_skip(gpt, blocks=[1], method="ltd", keep=0.25)
    skipper.draw((0, 3, 0), batch=2, tokens=[32, 32])  # the choice is drawn outside forward
    x = torch.randn(2, 32, 32)
    out = block(x)
    changed = (out != x).any(-1)
    assert changed.sum(1).tolist() == [8, 8]  # a quarter processed, the rest passed through exactly
    kept = changed.nonzero()[:, 1].view(2, 8)
    reference = Block.forward(block, x.gather(1, kept.unsqueeze(-1).expand(-1, -1, 32)))
    assert torch.allclose(out.gather(1, kept.unsqueeze(-1).expand(-1, -1, 32)), reference, atol=1e-6)
    assert not torch.equal(kept[0], kept[1])  # a subset per sample
    assert torch.equal(kept, skipper.settings[0].chosen)  # the drawn choice, as drawn
    skipper.remove()
    assert type(block) is Block and "_token_skip" not in block.__dict__


def test_ltd_is_causal_in_training_mode():
    """Same random choice, tokens after t changed: logits at positions <= t do not move."""
    gpt = _gpt().model.train()
    skipper = attach_skip(gpt, blocks=[0, 1], method="ltd", keep=0.5)
    skipper.draw((0, 7, 1), batch=3, tokens=[32, 32])
    idx = torch.randint(0, 256, (3, 32))
    for t in (0, 9, 20):
        a, b = gpt(idx), gpt(_future_changed(idx, t))
        assert torch.allclose(a[:, : t + 1], b[:, : t + 1], atol=1e-6), t
        assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])
    skipper.remove()


def test_mod_routes_a_capacity_fraction_and_trains_its_router():
    lm = _gpt()
    gpt = lm.model.train()
    skipper = attach_skip(gpt, blocks=[0, 1], method="mod", capacity=0.25)
    assert isinstance(getattr(gpt.blocks[0], ROUTER_NAME), torch.nn.Linear)
    assert any(ROUTER_NAME in name for name, _ in lm.named_parameters())  # the optimizer will see it
    logits = gpt(torch.randint(0, 256, (2, 32)))
    logits.float().pow(2).mean().backward()
    assert skipper.processed([32, 32]) == [8, 8]
    assert gpt.blocks[0].token_router.weight.grad.abs().sum() > 0
    assert skipper.settings[0].aux_loss > 0
    skipper.remove(keep_routers=False)
    assert not hasattr(gpt.blocks[0], ROUTER_NAME)


def test_mod_threshold_routing_is_causal_at_evaluation_and_in_generate():
    lm = _gpt().eval()
    gpt = lm.model
    skipper = attach_skip(gpt, blocks=[0, 1], method="mod", capacity=0.5)
    assert skipper.eval_routing == "threshold"
    with torch.no_grad():
        for block in gpt.blocks:  # route roughly half the tokens, by each token's own state
            block.token_router.bias.fill_(0.0)
            block.token_router.weight.normal_(std=1.0)
        idx = torch.randint(0, 256, (3, 32))
        full = gpt(idx)
        assert 0.0 < skipper.settings[0].router_fraction < 1.0  # routed: the tokens with logit > 0
        for t in (0, 11, 25):
            assert torch.allclose(gpt(_future_changed(idx, t))[:, : t + 1], full[:, : t + 1], atol=1e-5), t
            # generate() recomputes the prefix each step: a prefix alone gives the same logits
            assert torch.allclose(gpt(idx[:, : t + 1])[:, -1], full[:, t], atol=1e-5), t
    text = lm.generate("The ", max_new_tokens=12, seed=0)
    assert len(text.encode("utf-8", errors="replace")) >= 1 and 0.0 < skipper.settings[0].router_fraction < 1.0
    assert text == lm.generate("The ", max_new_tokens=12, seed=0)
    skipper.remove()


def test_skip_on_vit_keeps_the_class_token_processed():
    torch.manual_seed(0)
    vit = tiny_vit().model.train()
    skipper = attach_skip(vit, blocks=[1], method="ltd", keep=0.5)
    x = torch.randn(2, 17, 32)
    out = vit.blocks[1](x)
    changed = (out != x).any(-1)
    assert changed[:, 0].all() and changed.sum(1).tolist() == [9, 9]
    skipper.remove()


def test_mod_on_vit_routes_top_k_patches_and_always_processes_the_class_token():
    torch.manual_seed(0)
    vit = tiny_vit().model.eval()
    skipper = attach_skip(vit, blocks=[1], method="mod", capacity=0.25)
    assert skipper.eval_routing == "topk"  # not causal: evaluation routes like training
    x = torch.randn(2, 17, 32)
    out = vit.blocks[1](x)
    changed = (out != x).any(-1)
    assert changed[:, 0].all() and changed.sum(1).tolist() == [1 + 4, 1 + 4]
    skipper.remove(keep_routers=False)


def test_a_fresh_module_loads_mod_routers_and_a_later_skip_reuses_them():
    """What the main process gets after a ddp_spawn fit: a state dict with routers, loaded into a
    module that never had them (also with a compiled inner model)."""
    lm = _gpt()
    attach_skip(lm.model, blocks=[0, 1], method="mod")
    state = lm.state_dict()
    for compiled in (False, True):
        fresh = tiny_gpt()
        if compiled:
            fresh.model = torch.compile(fresh.model, backend="eager")
        fresh.load_state_dict(state)  # strict: every router key found its module
        gpt = fresh.model._orig_mod if compiled else fresh.model
        router = gpt.blocks[1].token_router
        assert torch.equal(router.weight, state["model.blocks.1.token_router.weight"])
        attach_skip(gpt, blocks=[0, 1], method="mod")
        assert gpt.blocks[1].token_router is router  # reused, not re-initialised
