"""Structured FFN layers and structured pruning: measured training-step speedup next to the
FLOP-predicted one, side by side in one process, one thread.

Each variant is a model built once (seeded) and transformed once, outside the timing: MLP
matrices replaced by low-rank / block-shuffle / block-dense layers (StructuredFFN's layers, with
or without the self-guided dense path), or attention heads and MLP units removed to a FLOPs
ratio (StructuredPruning's removal, uniform per layer). A training step (zero_grad, forward,
cross-entropy, backward, AdamW step) is timed ``--steps`` times per round; variants alternate
over ``--rounds`` rounds and the median step is kept. ``predicted`` is dense / variant FLOPs of
forward + backward (:func:`lit_eff.flops.count_flops`, what FlopsMonitor logs); ``measured`` is
dense / variant median step time; ``ratio`` = measured / predicted.

- ViT: timm ``vit_tiny`` family, width 192, depth 12, 3 heads, MLP 768, 32x32 inputs, patch 4
  (65 tokens), batch 32.
- GPT: the kit's GPT, width 192, 6 blocks, 6 heads, MLP 768, 256 tokens, batch 8.

    OMP_NUM_THREADS=1 python benchmarks/structured.py [--rounds 5] [--steps 3] [--model vit|gpt|both]
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
import torch.nn.functional as F

from lit_eff.flops import count_flops
from lit_eff.models import GPT
from lit_eff.structured import find_groups, find_linears, probe, structure_linears, uniform_ratio


def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", num_classes=10, in_chans=3, img_size=32, patch_size=4,
                             embed_dim=192, depth=12, num_heads=3)


def gpt():
    torch.manual_seed(0)
    return GPT(vocab_size=256, block_size=256, n_layer=6, n_head=6, n_embd=192)


def ffn(structure, guided=False, **kwargs):
    def apply(model, x):
        structure_linears(model, find_linears(model), structure, guided=guided, **kwargs)
    return apply


def pruned(target):
    """Heads and MLP units removed uniformly (lowest group L2 norm) to ``target`` of the FLOPs."""
    def apply(model, x):
        groups = find_groups(model)
        cost = probe(model, x, groups)
        rho = uniform_ratio(cost, target, groups)
        for group in groups:
            count = max(1, round(group.dense * (1 - rho)))
            group.keep(torch.sort(torch.argsort(group.importance(2), descending=True)[:count]).values)
    return apply


VARIANTS = {
    "dense": None,
    "lowrank r=48 (1/4)": ffn("lowrank", rank=48),
    "lowrank r=96 (1/2)": ffn("lowrank", rank=96),
    "lowrank r=48, self-guided phase": ffn("lowrank", rank=48, guided=True),
    "blockshuffle 4 blocks": ffn("blockshuffle", blocks=4),
    "blockdense r=96, 4 blocks": ffn("blockdense", rank=96, blocks=4),
    "pruned heads+MLP to 0.5 FLOPs": pruned(0.5),
    "pruned heads+MLP to 0.3 FLOPs": pruned(0.3),
}


def run(make_model, make_batch, steps: int, rounds: int) -> None:
    models, flops = {}, {}
    for name, apply in VARIANTS.items():
        model = make_model()
        x, y = make_batch()
        if apply is not None:
            apply(model, x)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        models[name] = (model, optimizer)
        flops[name] = count_flops(lambda m=model: m(x)).total
    x, y = make_batch()

    def step(model, optimizer):
        optimizer.zero_grad(set_to_none=True)
        logits = model(x)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).backward()
        optimizer.step()

    times = {name: [] for name in VARIANTS}
    for name, (model, optimizer) in models.items():  # warm-up
        step(model, optimizer)
    for _ in range(rounds):
        for name, (model, optimizer) in models.items():
            for _ in range(steps):
                start = time.perf_counter()
                step(model, optimizer)
                times[name].append(time.perf_counter() - start)
    base_time, base_flops = statistics.median(times["dense"]), flops["dense"]
    print(f"  {'variant':36s} {'ms/step':>8s} {'FLOPs':>9s} {'predicted':>9s} {'measured':>9s} {'ratio':>6s}")
    for name in VARIANTS:
        median = statistics.median(times[name])
        predicted, measured = base_flops / flops[name], base_time / median
        print(f"  {name:36s} {median * 1e3:8.1f} {flops[name]:9.3g} {predicted:8.2f}x {measured:8.2f}x "
              f"{measured / predicted:6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--model", choices=["vit", "gpt", "both"], default="both")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread, {args.steps} steps x {args.rounds} rounds, "
          f"median step")
    if args.model in ("vit", "both"):
        print("ViT (width 192, depth 12, MLP 768, 65 tokens, batch 32)")
        run(vit, lambda: (torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))), args.steps, args.rounds)
    if args.model in ("gpt", "both"):
        print("GPT (width 192, 6 blocks, MLP 768, 256 tokens, batch 8)")
        run(gpt, lambda: (torch.randint(0, 256, (8, 256)), torch.randint(0, 256, (8, 256))), args.steps, args.rounds)


if __name__ == "__main__":
    main()
