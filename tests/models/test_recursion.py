"""Mixture-of-Recursions on the kit's GPT: the routing against a re-derivation of the official
code, causality at evaluation and in generate(), the KV cache, FLOPs, bad inputs."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.nn.utils.rnn import pad_sequence

from lit_eff.callbacks import FlopsMonitor
from lit_eff.flops import count_flops
from lit_eff.models import CausalLM, GPT
from lit_eff.models.gpt import Block
from lit_eff.models.kv_cache import KVCache
from lit_eff.tokens.recursion import Recursion, RecursionStats, recurse
from lit_eff.tokens.skip import attach_skip
from tests.helpers import make_trainer, seeded, text
from tests.test_flops import ReferenceCounter


def mor_lm(routing: str = "expert", n_layer: int = 4, **kwargs) -> CausalLM:
    recursion = Recursion(**{"recursions": 2, "routing": routing, **kwargs})
    return CausalLM(block_size=32, n_layer=n_layer, n_head=2, n_embd=32, recursion=recursion)


def loud_routers(gpt: GPT) -> None:
    """Router weights large enough that routing depends clearly on each token."""
    with torch.no_grad():
        for router in gpt.routers:
            router.weight.normal_(std=1.0)


# --- the official algorithm, re-derived from raymin0223/mixture_of_recursions -------------------

def official_expert(x, stack, routers, capacity, alpha):
    """model/mor_model/expert_choice_router.py: per recursion, top-k of the previously selected
    tokens by ``alpha * sigmoid(router(x))`` (k from the full length), sorted, processed, and
    ``scatter_add``-ed back weighted; BCE ``aux_loss`` on the raw logits (sum / (bs * n))."""
    prev, sampling_loss = None, 0.0
    for r, router in enumerate(routers):
        bs, seq_len, hidden = x.shape
        top_k = max(1, int(capacity[r] * seq_len))
        h = x if prev is None else torch.gather(x, 1, prev.expand(-1, -1, hidden))
        raw = router(h)
        probs = torch.sigmoid(raw) * alpha
        weights, selected = torch.topk(probs, top_k, dim=1, sorted=False)
        selected, index = torch.sort(selected, dim=1)
        weights = torch.gather(weights, 1, index)
        top = torch.gather(h, 1, selected.expand(-1, -1, hidden))
        targets = torch.zeros_like(probs).scatter_(1, selected, torch.ones_like(selected, dtype=probs.dtype))
        sampling_loss = sampling_loss + F.binary_cross_entropy_with_logits(
            raw.view(-1), targets.view(-1), reduction="sum") / (bs * raw.shape[1])
        if prev is not None:
            selected = torch.gather(prev, 1, selected)
        x = torch.scatter_add(x, 1, selected.expand(-1, -1, hidden), stack(top, r) * weights)
        prev = selected
    return x, sampling_loss


def official_token(x, stack, router, recursions, alpha=1.0):
    """model/mor_model/token_choice_router.py: top-1 depth per token from ``softmax(router(x))``;
    per recursion the tokens of depth >= r, each row packed and zero-padded (empty rows
    dropped); finishing tokens ``scatter_add`` their weighted output onto the input; balancing
    loss ``sum(P_i * f_i)`` and z-loss."""
    bs, seq_len, hidden = x.shape
    final_x, updates = x.clone(), x.clone()
    raw = router(x)
    probs = F.softmax(raw, dim=-1) * alpha
    _, top = torch.topk(probs, 1, dim=-1, sorted=False)
    weights = torch.gather(probs, -1, top)
    top = top.squeeze(-1)
    for index in range(recursions):
        rows, seqs, batched = [], [], []
        for i in range(bs):
            indices = torch.where(top[i] >= index)[0]
            if indices.numel():
                rows.append(i), seqs.append(indices), batched.append(x[i, indices])
        if not batched:
            continue
        out = stack(pad_sequence(batched, batch_first=True, padding_value=0.0), index)
        for j, b in enumerate(rows):
            indices = seqs[j]
            unpad = out[j, : indices.numel()]
            depth = top[b].gather(0, indices)
            finished = torch.where(depth == index)[0]
            total = indices[finished]
            src = unpad[finished] * weights[b].gather(0, total.view(-1, 1))
            final_x[b] = torch.scatter_add(final_x[b], 0, total.view(-1, 1).expand(-1, hidden), src)
            if index < recursions - 1:
                going = torch.where(depth > index)[0]
                updates[b] = torch.scatter(x[b], 0, indices[going].view(-1, 1).expand(-1, hidden), unpad[going])
        x = updates
    share = probs.sum(dim=(0, 1)) / (bs * seq_len)
    picked = recursions * torch.bincount(top.view(-1), minlength=recursions) / (bs * seq_len)
    z_loss = torch.logsumexp(raw, dim=-1).square().mean()
    return final_x, (share * picked).sum(), z_loss


def shared_stack(gpt: GPT):
    first, shared, _ = gpt.layout

    def stack(h, r):
        for block in gpt.blocks[first : first + shared]:
            h = Block.forward(block, h)
        return h

    return stack


@pytest.mark.parametrize("routing", ["expert", "token"])
def test_routing_matches_the_official_algorithm_outputs_losses_and_router_gradients(routing):
    seeded(0)
    kwargs = {"capacity": [0.75, 0.5, 0.25]} if routing == "expert" else {}
    gpt = mor_lm(routing, n_layer=5, recursions=3, **kwargs).model.train()
    loud_routers(gpt)
    x = torch.randn(3, 24, 32)
    probe = torch.randn(3, 24, 32)
    stack = shared_stack(gpt)
    stats = RecursionStats()
    ours = recurse(x, stack, gpt.routers, gpt.recursion, stats, training=True)
    (ours * probe).sum().backward()
    ours_grads = [r.weight.grad.clone() for r in gpt.routers]
    gpt.zero_grad()
    s = gpt.recursion
    if routing == "expert":
        reference, sampling = official_expert(x, stack, gpt.routers, s.capacity, s.alpha)
        aux = s.aux_loss_weight * sampling
    else:
        reference, balance, z_loss = official_token(x, stack, gpt.routers[0], s.recursions, s.alpha)
        aux = s.balance_loss_weight * balance + s.z_loss_weight * z_loss
    ((reference * probe).sum() + aux).backward()
    assert torch.allclose(ours, reference, atol=1e-5)
    assert float(stats.aux_loss) == pytest.approx(float(aux), rel=1e-5)
    for mine, theirs in zip(ours_grads, [r.weight.grad for r in gpt.routers]):
        assert torch.allclose(mine, theirs, atol=1e-5, rtol=1e-4)
    if routing == "expert":  # hierarchical: 75%, 50%, 25% of the sequence
        assert stats.processed.tolist() == [18 / 24, 12 / 24, 6 / 24]
    else:  # every token takes step 0, then fewer; not all the same depth
        assert stats.processed[0] == 1.0 and 0.0 < stats.processed[2] < stats.processed[1] < 1.0


def _future_changed(idx: torch.Tensor, t: int) -> torch.Tensor:
    other = idx.clone()
    other[:, t + 1 :] = (other[:, t + 1 :] + 17) % 256
    return other


@pytest.mark.parametrize("routing", ["expert", "token"])
def test_evaluation_routing_is_causal_and_the_recursion_wise_cache_decodes_like_the_full_forward(routing):
    seeded(0)
    lm = mor_lm(routing, **({"capacity": [1.0, 0.5]} if routing == "expert" else {})).eval()
    gpt = lm.model
    loud_routers(gpt)
    with torch.no_grad():
        idx = torch.randint(0, 256, (3, 32))
        full = gpt(idx)
        assert 0.0 < float(gpt.mor_stats.processed[1]) < 1.0  # routed by each token's own state
        for t in (0, 11, 25):
            assert torch.allclose(gpt(_future_changed(idx, t))[:, : t + 1], full[:, : t + 1], atol=1e-5), t
            assert torch.allclose(gpt(idx[:, : t + 1])[:, -1], full[:, t], atol=1e-5), t
        # one token at a time through a KV cache: the same logits as the whole sequence at once
        cache, row = KVCache(), idx[1:2]
        steps = [gpt(row[:, :5], cache)]
        steps += [gpt(row[:, i : i + 1], cache) for i in range(5, 32)]
        assert torch.allclose(torch.cat(steps, dim=1), full[1:2], atol=1e-5)
        first, shared, _ = gpt.layout
        # recursion-wise: the second step caches only the tokens that took it
        assert cache.layers[(first, 0)].k.shape[2] == 32 > cache.layers[(first, 1)].k.shape[2] > 0
    assert lm.generate("The ", max_new_tokens=12, seed=0) == lm.generate("The ", max_new_tokens=12, seed=0,
                                                                         use_cache=False)


def test_expert_top_k_evaluation_routes_like_training_and_decodes_without_a_cache():
    seeded(0)
    lm = mor_lm("expert", capacity=[1.0, 0.25], eval_routing="topk").eval()
    with torch.no_grad():
        lm.model(torch.randint(0, 256, (2, 32)))
    assert lm.model.mor_stats.processed.tolist() == [1.0, 0.25]
    assert not lm.model.can_cache()
    assert len(lm.generate("ab", max_new_tokens=3, seed=0)) >= 1


def _fit_counted(module: CausalLM, steps: int):
    monitor = FlopsMonitor()
    probe = ReferenceCounter(monitor)
    make_trainer(max_steps=steps, callbacks=[monitor, probe], limit_val_batches=0).fit(module, datamodule=text())
    assert probe.monitored == pytest.approx(probe.reference, rel=1e-6)  # FlopsMonitor == FlopCounterMode
    return monitor, probe.reference


def test_training_flops_follow_the_routing_and_flops_monitor_counts_them_like_flop_counter_mode():
    seeded(0)
    monitor, token_steps = _fit_counted(mor_lm("token"), steps=4)
    assert len(set(token_steps)) > 1, "token-choice depths did not change a step's FLOPs"
    assert monitor.counted_batches == 4  # data-dependent shapes: every step traced
    per_step = {}
    for name, kwargs in {"none": {"routing": "none"}, "half": {"capacity": [1.0, 0.5]},
                         "quarter": {"capacity": [1.0, 0.25]}}.items():
        seeded(0)
        monitor, steps = _fit_counted(mor_lm(**kwargs), steps=2)
        assert monitor.counted_batches == 1 and steps[0] == steps[1]  # static shapes: counted once
        per_step[name] = steps[0]
    assert per_step["quarter"] < per_step["half"] < per_step["none"]
    assert min(token_steps) < per_step["none"]


def test_token_choice_compiles_without_per_step_recompiles():
    """Depths change every batch: the shapes become dynamic at the first change and nothing
    compiles again after it (dynamo alone: recompiles are decided before any backend)."""
    seeded(0)
    gpt = mor_lm("token").model.train()
    batches = [torch.randint(0, 256, (4, 32)) for _ in range(6)]
    torch._dynamo.reset()
    compiled = torch.compile(gpt, backend="eager")
    built = []
    try:
        for idx in batches:  # no optimizer step: the routing stays that of the weights below
            before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            compiled(idx).float().square().mean().backward()
            built.append(torch._dynamo.utils.counters["stats"]["unique_graphs"] - before)
    finally:
        torch._dynamo.reset()
    lengths = []  # the padded length the shared block ran at the second recursion, eagerly
    hook = gpt.blocks[1].register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    with torch.no_grad():
        for idx in batches:
            gpt(idx)
    hook.remove()
    second = lengths[1::2]
    assert len(set(second)) >= 3 and max(second) < 32, second  # shapes changed more than once
    assert built[0] > 0 and sum(1 for b in built[1:] if b) <= 1, built


def test_a_recipe_builds_the_recursive_model_through_the_cli():
    from lit_eff.cli import LitEffCLI

    configs = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
    cli = LitEffCLI(args=["--config", os.path.join(configs, "gpt_text.yaml"), "--config",
                          os.path.join(configs, "recipes", "mor", "expert_middle_cycle.yaml")], run=False)
    gpt = cli.model.model
    assert gpt.layout == (1, 1, 1) and len(gpt.blocks) == 3 and len(gpt.routers) == 2
    assert gpt.recursion.capacity == [1.0, 0.5] and cli.trainer.max_steps == 1035


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"recursions": 1}, r"`recursions`.*got recursions=1"),
    ({"sharing": "sequence"}, r"`sharing`.*middle_cycle.*got sharing='sequence'"),
    ({"routing": "random"}, r"`routing`.*got routing='random'"),
    ({"eval_routing": "all"}, r"`eval_routing`.*got eval_routing='all'"),
    ({"router_func": "softmax"}, r"`router_func` in \['sigmoid', 'tanh'\] with routing='expert', got "
                                 r"router_func='softmax'"),
    ({"capacity": [1.0]}, r"`capacity` to be a list of 2 fractions.*got capacity=\[1.0\]"),
    ({"capacity": [1.5, 0.5]}, r"`capacity`.*got capacity=1.5"),
    ({"capacity": [0.5, 1.0]}, r"`capacity` in non-increasing order.*got capacity=\[0.5, 1.0\]"),
    ({"alpha": 0.0}, r"`alpha`.*got alpha=0.0"),
    ({"aux_loss_weight": -1.0}, r"`aux_loss_weight`.*got aux_loss_weight=-1.0"),
])
def test_bad_recursion_settings_are_refused_with_the_argument_and_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Recursion(**kwargs)


def test_bad_model_combinations_are_refused_before_training():
    with pytest.raises(ValueError, match=r"`recursions` to divide n_layer - 2.*got n_layer=5, recursions=2"):
        mor_lm(n_layer=5)
    with pytest.raises(ValueError, match=r"`recursions` to divide n_layer with sharing='cycle'.*n_layer=5"):
        mor_lm(n_layer=5, sharing="cycle")
    with pytest.raises(ValueError, match=r"cannot attach to a GPT with Mixture-of-Recursions"):
        attach_skip(mor_lm().model, blocks=[0], method="mod")
    from lightning.pytorch.plugins import MixedPrecision  # Lightning turns "16-mixed" into bf16 on CPU

    trainer = make_trainer(max_steps=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))])
    with pytest.raises(ValueError, match=r"routing='expert' cannot run under precision='16-mixed'"):
        trainer.fit(mor_lm(), datamodule=text())


def test_the_report_names_a_recursive_model_as_its_technique(tmp_path):
    from lit_eff.report import techniques

    for name, recursion in (("dense", None), ("mor", {"recursions": 2})):
        os.makedirs(tmp_path / name)
        config = {"model": {"class_path": "lit_eff.models.CausalLM", "init_args": {"recursion": recursion}},
                  "trainer": {"callbacks": [{"class_path": "lit_eff.callbacks.FlopsMonitor"}]}}
        (tmp_path / name / "config.yaml").write_text(yaml.safe_dump(config))
    assert techniques(str(tmp_path / "dense")) == []
    assert techniques(str(tmp_path / "mor")) == ["MixtureOfRecursions"]


def test_a_step_no_token_takes_still_runs_the_shared_block_without_changing_any_output():
    """Under FSDP2 every rank must call a sharded block alike: the empty step runs on one padding
    token whose output is discarded (a KV cache skips it: it holds only tokens that took a step)."""
    seeded(0)
    lm = mor_lm("expert", capacity=[1.0, 0.5]).eval()
    gpt = lm.model
    with torch.no_grad():
        gpt.routers[1].weight.zero_()  # logit 0 everywhere: no token takes step 1 (threshold > 0)
        calls = []
        hook = gpt.blocks[1].register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[1]))
        idx = torch.randint(0, 256, (2, 16))
        full = gpt(idx)
        hook.remove()
        assert calls == [16, 1] and float(gpt.mor_stats.processed[1]) == 0.0
        cache = KVCache()
        decoded = torch.cat([gpt(idx[:1, :4], cache)] + [gpt(idx[:1, i : i + 1], cache) for i in range(4, 16)], 1)
        assert (gpt.layout[0], 1) not in cache.layers
        assert torch.allclose(decoded, full[:1], atol=1e-5)


def test_a_flops_budget_plans_expert_choice_and_refuses_to_plan_token_choice():
    from lit_eff.callbacks import FlopsBudget

    seeded(0)
    step = count_flops(lambda: mor_lm().model.train()(torch.randint(0, 256, (8, 32)))).total
    budget = FlopsBudget(budget=3.5 * step)
    trainer = make_trainer(max_steps=100, callbacks=[FlopsMonitor(), budget], limit_val_batches=0)
    trainer.fit(mor_lm(), datamodule=text())
    assert budget.planned_steps == trainer.global_step == 4  # static shapes: planned from one counted step
    with pytest.raises(ValueError, match=r"cannot tell ahead how CausalLM \(the compute of its steps is drawn at "
                                         r"random or depends on the data\).*plan: false"):
        make_trainer(max_steps=4, callbacks=[FlopsMonitor(), FlopsBudget(budget=1e9)]).fit(
            mor_lm("token"), datamodule=text())
