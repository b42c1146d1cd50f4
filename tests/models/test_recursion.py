"""Mixture-of-Recursions on the kit's GPT: the routing against a re-derivation of the official
code, causality at evaluation and in generate(), the KV cache, FLOPs, bad inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from lit_eff.callbacks import FlopsMonitor
from lit_eff.models import CausalLM, GPT
from lit_eff.models.gpt import Block
from lit_eff.models.kv_cache import KVCache
from lit_eff.tokens.recursion import Recursion, RecursionStats, recurse
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
