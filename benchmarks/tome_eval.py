"""ToMe applied training-free to a trained digits ViT: test accuracy and inference speedup vs r.

Loads a checkpoint of ``configs/vit_digits.yaml`` (dense training), then for each ``r`` attaches
:func:`lit_eff.tokens.attach_merge` (official ToMe, proportional attention) and prints the test
accuracy, the FLOP-predicted forward speedup (:func:`lit_eff.flops.count_flops`) and the measured
inference speedup over the whole test split (median of rounds, variants alternating).

    OMP_NUM_THREADS=1 python benchmarks/tome_eval.py CKPT [CKPT ...] [--r 0 1 2 3] [--blocks 2 3] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import yaml

from lit_eff.datamodules import DigitsDataModule
from lit_eff.flops import count_flops
from lit_eff.models import ImageClassifier
from lit_eff.tokens import attach_merge


@torch.no_grad()
def evaluate(model, batches) -> tuple[float, float]:
    start = time.perf_counter()
    correct = total = 0
    for x, y in batches:
        correct += int((model(x).argmax(-1) == y).sum())
        total += len(y)
    return correct / total, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpts", nargs="+")
    parser.add_argument("--r", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--blocks", type=int, nargs="+", default=None, help="merging blocks (default: all)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--config", default="configs/vit_digits.yaml")
    args = parser.parse_args()
    config = yaml.safe_load(open(args.config))
    data = DigitsDataModule(**{**config["data"]["init_args"], "batch_size": 256})
    data.setup("test")
    batches = list(data.test_dataloader())
    print(f"{len(batches[0][0]) if batches else 0}-image batches, {sum(len(b[1]) for b in batches)} test images, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"{'ckpt':>4s} {'r':>2s} {'tokens out':>10s} {'test acc':>8s} {'pred':>6s} {'meas':>6s}")
    for c, path in enumerate(args.ckpts):
        model = ImageClassifier.load_from_checkpoint(path, map_location="cpu").model.eval()
        x0 = batches[0][0]
        results = {}
        for r in args.r:
            merger = attach_merge(model, r=r, blocks=args.blocks) if r else None
            flops = count_flops(lambda: model(x0), backward=False).total
            acc, _ = evaluate(model, batches)
            out = model.patch_embed.num_patches + model.num_prefix_tokens
            out = merger.tokens_out(out) if merger else out
            results[r] = [flops, acc, out, []]
            if merger:
                merger.remove()
        for _ in range(args.rounds + 1):
            for r in args.r:
                merger = attach_merge(model, r=r, blocks=args.blocks) if r else None
                results[r][3].append(evaluate(model, batches)[1])
                if merger:
                    merger.remove()
        base_flops, base_time = results[args.r[0]][0], statistics.median(results[args.r[0]][3][1:])
        for r in args.r:
            flops, acc, out, times = results[r]
            print(f"{c:4d} {r:2d} {out:10d} {acc:8.4f} {base_flops / flops:5.2f}x "
                  f"{base_time / statistics.median(times[1:]):5.2f}x")


if __name__ == "__main__":
    main()
