"""Find the best subnet under a FLOPs budget on validation data, export it, plot the Pareto front.

    python -m lit_eff.supernet.search --ckpt lightning_logs/version_0/checkpoints/last.ckpt \\
        --budget-mflops 2.0 --method evolution --out search_out
    lit-eff search --ckpt ... --budget-mflops 2.0      # the same

Writes ``search_out/search.json`` (every evaluated subnet: config, MFLOPs, metric),
``search_out/pareto.png`` and ``search_out/subnet.pt`` (the exported plain model, its config and
state dict). Vision subnets are ranked by accuracy, language subnets by loss (lower is better).
Candidates are drawn from ``lit_eff.seeding.generator(seed, "supernet-search", ...)``.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lit_eff.seeding import generator
from lit_eff.supernet.space import SubnetConfig


@dataclass
class Result:
    config: SubnetConfig
    flops: int
    metric: float  # accuracy (vision, higher is better) or loss (language, lower is better)


def _check_budget(module, budget: float) -> None:
    smallest = module.subnet_flops(module.space.min())
    if budget < smallest:
        raise ValueError(f"Expected a FLOPs budget of at least the smallest subnet's {smallest / 1e6:.4g} MFLOPs "
                         f"({module.space.min().short()}), got budget={budget / 1e6:.4g} MFLOPs")


@torch.no_grad()
def evaluate(module, cfg: SubnetConfig, batches: list) -> float:
    """Accuracy (vision) or mean loss (language) of ``cfg`` over ``batches``."""
    was_training, previous = module.training, module.model.subnet
    module.eval()
    module.model.subnet = cfg
    hits = loss = count = 0.0
    for x, y in batches:
        logits = module.model(x.to(module.device)).float()
        y = y.to(module.device)
        if module.vision:
            hits += float((logits.argmax(-1) == y).sum())
        else:
            loss += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"))
        count += y.numel()
    module.model.subnet = previous
    module.train(was_training)
    return (hits if module.vision else loss) / count


def _better(module, a: Result, b: Result | None) -> bool:
    return b is None or (a.metric > b.metric if module.vision else a.metric < b.metric)


def _sample_under(module, gen: torch.Generator, budget: float, tries: int = 200) -> SubnetConfig:
    for _ in range(tries):
        cfg = module.space.sample(gen)
        if module.subnet_flops(cfg) <= budget:
            return cfg
    return module.space.min()


def _mutate(module, cfg: SubnetConfig, gen: torch.Generator, p: float = 0.3) -> SubnetConfig:
    s = module.space
    rnd = s.sample(gen)
    def coin() -> bool:
        return float(torch.rand((), generator=gen)) < p
    depth = rnd.depth if coin() else cfg.depth
    heads = [rnd.num_heads[i] if i < rnd.depth and coin() else (cfg.num_heads[i] if i < cfg.depth else s.num_heads[0])
             for i in range(depth)]
    ratios = [rnd.mlp_ratio[i] if i < rnd.depth and coin() else (cfg.mlp_ratio[i] if i < cfg.depth else s.mlp_ratio[0])
              for i in range(depth)]
    return SubnetConfig(rnd.embed_dim if coin() else cfg.embed_dim, depth, tuple(heads), tuple(ratios))


def _crossover(a: SubnetConfig, b: SubnetConfig, gen: torch.Generator) -> SubnetConfig:
    pick = lambda x, y: x if float(torch.rand((), generator=gen)) < 0.5 else y  # noqa: E731
    depth = pick(a.depth, b.depth)
    layer = lambda seq, i: seq[min(i, len(seq) - 1)]  # noqa: E731
    return SubnetConfig(pick(a.embed_dim, b.embed_dim), depth,
                        tuple(pick(layer(a.num_heads, i), layer(b.num_heads, i)) for i in range(depth)),
                        tuple(pick(layer(a.mlp_ratio, i), layer(b.mlp_ratio, i)) for i in range(depth)))


def search(module, batches: list, budget_flops: float, method: str = "evolution", candidates: int = 48,
           population: int = 12, seed: int = 0) -> tuple[Result, list[Result]]:
    """Best subnet with forward FLOPs <= ``budget_flops`` and every evaluated one.

    ``random``: ``candidates`` random subnets under the budget (plus the smallest). ``evolution``:
    a population of ``population`` under the budget, then generations of mutations and crossovers
    of the best half until ``candidates`` subnets have been evaluated."""
    if method not in ("random", "evolution"):
        raise ValueError(f"Expected `method` in ['random', 'evolution'], got method={method!r}")
    if candidates < 1 or population < 2:
        raise ValueError(f"Expected `candidates` >= 1 and `population` >= 2, got candidates={candidates}, "
                         f"population={population}")
    _check_budget(module, budget_flops)
    seen: dict[SubnetConfig, Result] = {}

    def score(cfg: SubnetConfig) -> Result:
        if cfg not in seen:
            seen[cfg] = Result(cfg, module.subnet_flops(cfg), evaluate(module, cfg, batches))
        return seen[cfg]

    gen = generator(seed, "supernet-search", method)
    score(module.space.min())
    if module.subnet_flops(module.space.max()) <= budget_flops:
        score(module.space.max())
    size = candidates if method == "random" else min(population, candidates)
    for _ in range(size * 4):
        if len(seen) >= size:
            break
        score(_sample_under(module, gen, budget_flops))
    while method == "evolution" and len(seen) < candidates:
        ranked = sorted(seen.values(), key=lambda r: -r.metric if module.vision else r.metric)
        parents = [r.config for r in ranked if r.flops <= budget_flops][: max(2, population // 2)]
        before = len(seen)
        for _ in range(population * 4):
            if len(seen) >= min(candidates, before + population):
                break
            i, j = torch.randint(len(parents), (2,), generator=gen).tolist()
            child = _mutate(module, _crossover(parents[i], parents[j], gen), gen)
            if module.subnet_flops(child) <= budget_flops:
                score(child)
        if len(seen) == before:
            break
    results = list(seen.values())
    best = None
    for r in results:
        if r.flops <= budget_flops and _better(module, r, best):
            best = r
    return best, results


def pareto_front(results: list[Result], higher_is_better: bool) -> list[Result]:
    """The results no other result beats with no more FLOPs, by ascending FLOPs."""
    front, best = [], None
    for r in sorted(results, key=lambda r: (r.flops, -r.metric if higher_is_better else r.metric)):
        if best is None or (r.metric > best if higher_is_better else r.metric < best):
            front.append(r)
            best = r.metric
    return front


def plot_pareto(results: list[Result], best: Result, budget_flops: float, path: str, vision: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.scatter([r.flops / 1e6 for r in results], [r.metric for r in results], s=12, alpha=0.5, label="evaluated")
    front = pareto_front(results, vision)
    ax.plot([r.flops / 1e6 for r in front], [r.metric for r in front], "r.-", label="Pareto front")
    ax.axvline(budget_flops / 1e6, color="gray", ls="--", label="budget")
    ax.scatter([best.flops / 1e6], [best.metric], marker="*", s=150, c="k", label="chosen", zorder=3)
    ax.set_xlabel("MFLOPs per sample (forward)")
    ax.set_ylabel("val acc" if vision else "val loss")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _datamodule(module, batch_size: int):
    from lit_eff.datamodules import DigitsDataModule, TextDataModule

    if module.vision:
        return DigitsDataModule(batch_size=batch_size)
    return TextDataModule(block_size=module.model.block_size, batch_size=batch_size)


def cli(argv: list[str] | None = None) -> None:
    """``lit-eff search --ckpt CKPT --budget-mflops X [options]`` (exit status 0)."""
    run(argv)


def run(argv: list[str] | None = None) -> Result:
    """The search command; returns the chosen subnet."""
    parser = argparse.ArgumentParser(prog="lit-eff search", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="a SupernetModule checkpoint")
    parser.add_argument("--budget-mflops", type=float, required=True, help="forward MFLOPs per sample")
    parser.add_argument("--method", choices=["evolution", "random"], default="evolution")
    parser.add_argument("--candidates", type=int, default=48)
    parser.add_argument("--population", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batches", type=int, default=8, help="validation batches per candidate")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", default="search_out")
    args = parser.parse_args(argv)
    from lit_eff.supernet.module import SupernetModule

    module = SupernetModule.load_from_checkpoint(args.ckpt, map_location="cpu")
    _check_budget(module, args.budget_mflops * 1e6)
    dm = _datamodule(module, args.batch_size)
    dm.setup("fit")
    batches = [b for _, b in zip(range(args.batches), dm.val_dataloader())]
    best, results = search(module, batches, args.budget_mflops * 1e6, args.method, args.candidates,
                           args.population, args.seed)
    os.makedirs(args.out, exist_ok=True)
    exported = module.export(best.config)
    torch.save({"config": best.config.to_dict(), "arch": module.hparams.arch, "model": exported,
                "state_dict": exported.state_dict()}, os.path.join(args.out, "subnet.pt"))
    with open(os.path.join(args.out, "search.json"), "w") as f:
        json.dump({"ckpt": args.ckpt, "budget_mflops": args.budget_mflops, "method": args.method, "seed": args.seed,
                   "best": {**best.config.to_dict(), "mflops": best.flops / 1e6, "metric": best.metric},
                   "evaluated": [{**r.config.to_dict(), "mflops": r.flops / 1e6, "metric": r.metric}
                                 for r in results]}, f, indent=1)
    plot_pareto(results, best, args.budget_mflops * 1e6, os.path.join(args.out, "pareto.png"), module.vision)
    name = "acc" if module.vision else "loss"
    print(f"best under {args.budget_mflops:g} MFLOPs: {best.config.short()} at {best.flops / 1e6:.3f} MFLOPs, "
          f"val {name} {best.metric:.4f} ({len(results)} subnets evaluated); wrote {args.out}/")
    return best


if __name__ == "__main__":
    cli()
