"""Token reduction: FLOP-predicted vs measured training-step speedup, side by side in one process.

Each variant attaches a :mod:`lit_eff.tokens` reducer to the same model instance (removed
afterwards), and a training step (zero_grad, forward, cross-entropy, backward, AdamW step) is
timed; variants alternate over several rounds and the median is kept. The predicted speedup is
dense FLOPs / reduced FLOPs of forward + backward from :func:`lit_eff.flops.count_flops` (what
FlopsMonitor logs); ``ratio`` = measured speedup / predicted speedup (target >= 0.85).

- ViT: timm ``vit_tiny`` family, width 192, depth 12, 3 heads, 32x32 synthetic images, patch 4
  (64 patch tokens + class token), batch 32. TokenDrop keeping 50% (and 25%) of the patch tokens
  from block 4 (a third of the depth), PyramidDrop 1 -> 0.5 -> 0.25 at blocks 4 and 8, TokenMerge
  (r=4 per block, in training), TokenSkip random-LTD 50% on blocks 1..10.
- GPT: the kit's GPT, width 192, 6 blocks, 6 heads, block size 256, batch 8. TokenSkip random-LTD
  50% on blocks 1..4 (DeepSpeed's default: all but the first and last), 75%/50%/25% on all blocks, and
  Mixture-of-Depths at capacity 50% on every block.
- ViT inference (no grad, batch 64): TokenMerge training-free (r=4 in every block; r=8 in the
  first 6 blocks) and TokenDrop at evaluation; predicted from forward FLOPs.
- ``--compile``: the same ViT training step eager and under ``torch.compile`` (inductor), dense
  and TokenDrop; ``compiled`` = eager time / compiled time of the same variant. The random
  choice is drawn outside the model each step, as the callback does.

    OMP_NUM_THREADS=1 python benchmarks/tokens.py [--rounds 4] [--steps 3] [--only vit|gpt|compile]
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
from lit_eff.tokens import TokenDropper, TokenSkipper, attach_drop, attach_merge, attach_skip


def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", num_classes=10, in_chans=3, img_size=32, patch_size=4,
                             embed_dim=192, depth=12, num_heads=3)


def gpt():
    torch.manual_seed(0)
    return GPT(vocab_size=256, block_size=256, n_layer=6, n_head=6, n_embd=192)


VIT_VARIANTS = {
    "dense": None,
    "TokenDrop keep 0.5 from block 4 (attn)": lambda m: attach_drop(m, [4], [0.5], score="attn"),
    "TokenDrop keep 0.25 from block 4 (attn)": lambda m: attach_drop(m, [4], [0.25], score="attn"),
    "TokenDrop 1->0.5->0.25 at 4, 8 (cosine)": lambda m: attach_drop(m, [4, 8], [0.5, 0.25], score="cosine"),
    "TokenMerge r=4 every block (train)": lambda m: attach_merge(m, r=4, mode="both"),
    "TokenSkip LTD 0.5 blocks 1-10": lambda m: attach_skip(m, list(range(1, 11)), "ltd", keep=0.5),
}
VIT_EVAL_VARIANTS = {
    "dense": None,
    "TokenMerge r=4 every block (eval)": lambda m: attach_merge(m, r=4, mode="eval"),
    "TokenMerge r=8 blocks 0-5 (eval)": lambda m: attach_merge(m, r=8, blocks=list(range(6)), mode="eval"),
    "TokenDrop keep 0.5 from block 4 (eval)": lambda m: attach_drop(m, [4], [0.5], score="attn", mode="eval"),
}
GPT_VARIANTS = {
    "dense": None,
    "TokenSkip LTD 0.5 blocks 1-4": lambda m: attach_skip(m, [1, 2, 3, 4], "ltd", keep=0.5),
    "TokenSkip LTD 0.75 all blocks": lambda m: attach_skip(m, list(range(6)), "ltd", keep=0.75),
    "TokenSkip LTD 0.5 all blocks": lambda m: attach_skip(m, list(range(6)), "ltd", keep=0.5),
    "TokenSkip LTD 0.25 all blocks": lambda m: attach_skip(m, list(range(6)), "ltd", keep=0.25),
    "TokenSkip MoD capacity 0.5 all blocks": lambda m: attach_skip(m, list(range(6)), "mod", capacity=0.5),
}


def draw(reducer, x: torch.Tensor, keys: tuple) -> None:
    """The random choice of a step, drawn outside the model (as the callbacks do)."""
    if isinstance(reducer, TokenDropper) and reducer.score == "random":
        reducer.draw(keys, x.shape[0])
    elif isinstance(reducer, TokenSkipper) and reducer.method == "ltd":
        reducer.draw(keys, x.shape[0], [x.shape[1]] * reducer.adapter.depth)


def bench(make_model, variants, make_batch, loss_fn, rounds: int, steps: int, train: bool = True) -> None:
    """Training steps (``train``) or no-grad inference forwards of each variant."""
    x, y = make_batch()
    flops, times = {}, {name: [] for name in variants}
    models = {}
    for name, attach in variants.items():
        model = make_model().train(train)
        reducer = attach(model) if attach else None
        draw(reducer, x, (0, 0, 0))
        if train:
            flops[name] = count_flops(lambda: loss_fn(model(x), y)).total
        else:
            with torch.no_grad():
                flops[name] = count_flops(lambda: model(x), backward=False).total
        models[name] = (model, reducer, torch.optim.AdamW(model.parameters(), lr=1e-4))
    for r in range(rounds + 1):  # round 0 warms up
        for name, (model, reducer, opt) in models.items():
            start = time.perf_counter()
            for s in range(steps):
                draw(reducer, x, (0, r, s))
                if not train:
                    with torch.no_grad():
                        model(x)
                    continue
                opt.zero_grad(set_to_none=True)
                loss_fn(model(x), y).backward()
                opt.step()
            if r:
                times[name].append((time.perf_counter() - start) / steps)
    base_t, base_f = statistics.median(times["dense"]), flops["dense"]
    print(f"{'variant':42s} {'GFLOP':>7s} {'pred':>6s} {'ms/' + ('step' if train else 'fwd'):>8s} {'meas':>6s} {'ratio':>6s}")
    for name in variants:
        t = statistics.median(times[name])
        pred, meas = base_f / flops[name], base_t / t
        print(f"{name:42s} {flops[name] / 1e9:7.2f} {pred:6.2f}x {t * 1e3:8.1f} {meas:6.2f}x {meas / pred:6.2f}")
    for _, reducer, _ in models.values():
        if reducer is not None:
            reducer.remove()


COMPILE_VARIANTS = {
    "dense": None,
    "TokenDrop keep 0.5 from block 4 (attn)": lambda m: attach_drop(m, [4], [0.5], score="attn"),
    "TokenDrop 1->0.5->0.25 at 4, 8 (random)": lambda m: attach_drop(m, [4, 8], [0.5, 0.25], score="random"),
}


def bench_compile(rounds: int, steps: int) -> None:
    """Eager vs compiled (inductor) training steps of the ViT, dense and with TokenDrop."""
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    runs = {}
    for name, attach in COMPILE_VARIANTS.items():
        for compiled in (False, True):
            model = vit().train()
            reducer = attach(model) if attach else None
            run = torch.compile(model) if compiled else model
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            runs[name, compiled] = (run, reducer, opt)
    times = {key: [] for key in runs}
    for r in range(rounds + 1):  # round 0 warms up (and compiles)
        for key, (run, reducer, opt) in runs.items():
            start = time.perf_counter()
            for s in range(steps):
                draw(reducer, x, (0, r, s))
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(run(x), y).backward()
                opt.step()
            if r:
                times[key].append((time.perf_counter() - start) / steps)
    print(f"{'variant':42s} {'eager ms':>9s} {'compiled ms':>12s} {'compiled':>9s} {'vs dense':>9s}")
    dense = statistics.median(times["dense", True])
    for name in COMPILE_VARIANTS:
        eager, compiled = statistics.median(times[name, False]), statistics.median(times[name, True])
        print(f"{name:42s} {eager * 1e3:9.1f} {compiled * 1e3:12.1f} {eager / compiled:8.2f}x {dense / compiled:8.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--only", choices=["vit", "gpt", "compile"], default=None)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); median of {args.rounds} rounds x "
          f"{args.steps} training steps")
    if args.only in (None, "vit"):
        print("\nViT width 192, depth 12, 32x32 images, patch 4 (64 patch tokens + cls), batch 32")
        bench(vit, VIT_VARIANTS, lambda: (torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))),
              lambda out, y: F.cross_entropy(out, y), args.rounds, args.steps)
        print("\nthe same ViT, inference (no grad), batch 64")
        bench(vit, VIT_EVAL_VARIANTS, lambda: (torch.randn(64, 3, 32, 32), None), None, args.rounds, args.steps,
              train=False)
    if args.only == "compile":
        print("\nViT width 192, depth 12, 32x32 images, patch 4, batch 32: eager vs torch.compile (inductor)")
        bench_compile(args.rounds, args.steps)
    if args.only in (None, "gpt"):
        print("\nGPT width 192, 6 blocks, block size 256, batch 8")
        bench(gpt, GPT_VARIANTS, lambda: (torch.randint(0, 256, (8, 256)), torch.randint(0, 256, (8, 256))),
              lambda out, y: F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)), args.rounds, args.steps)


if __name__ == "__main__":
    main()
