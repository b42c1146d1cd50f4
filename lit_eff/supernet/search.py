"""Find the best subnet of a trained supernet under a FLOPs budget on validation data, export it
and plot the Pareto front.

    lit-eff search --ckpt lightning_logs/version_0/checkpoints/last.ckpt --budget-mflops 2.0 --out search_out

Writes ``search_out/subnet.pt`` (the chosen subnet as plain data; load it with
``lit_eff.supernet.load_subnet("search_out/subnet.pt")``), ``search_out/search.json`` (every
evaluated subnet: name, config, MFLOPs, metric) and ``search_out/pareto.png``. Subnets are named
``width 48 · depth 2 · heads 2,4 · mlp 2,1.5`` (heads and MLP ratios per block). Vision subnets
are ranked by accuracy, language subnets by loss (lower is better). Candidates are drawn from
``lit_eff.seeding.generator(seed, "supernet-search", ...)``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import pickle
import re
import sys
import zipfile
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lit_eff.seeding import generator
from lit_eff.supernet.export import save_subnet
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
                         f"({module.space.min()}), got budget={budget / 1e6:.4g} MFLOPs")


@torch.no_grad()
def evaluate(module, cfg: SubnetConfig, batches: list) -> float:
    """Accuracy (vision) or mean loss (language) of ``cfg`` over ``batches``."""
    was_training = module.training
    module.eval()
    hits = loss = count = 0.0
    for x, y in batches:
        logits = module.model(x.to(module.device), cfg).float()
        y = y.to(module.device)
        if module.vision:
            hits += float((logits.argmax(-1) == y).sum())
        else:
            loss += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"))
        count += y.numel()
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
    from lit_eff.supernet.plot import figure

    fig, ax = figure(5, 3.5)
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


def _datamodule(module, batch_size: int):
    from lit_eff.datamodules import DigitsDataModule, TextDataModule

    if module.vision:
        return DigitsDataModule(batch_size=batch_size)
    return TextDataModule(block_size=module.model.block_size, batch_size=batch_size)


class SearchInputError(ValueError):
    """A bad argument or checkpoint, found before any work."""


def _check_args(args: argparse.Namespace) -> None:
    if not math.isfinite(args.budget_mflops) or args.budget_mflops <= 0:
        raise SearchInputError(f"Expected `--budget-mflops` to be a positive, finite number of MFLOPs, "
                               f"got {args.budget_mflops}")
    for name, low in (("batches", 1), ("batch_size", 1), ("candidates", 1), ("population", 2)):
        if getattr(args, name) < low:
            raise SearchInputError(f"Expected `--{name.replace('_', '-')}` >= {low}, got {getattr(args, name)}")


def load_supernet(path: str):
    """The SupernetModule of a checkpoint file, or a :class:`SearchInputError` naming the file and
    what is wrong with it."""
    from lit_eff.supernet.module import SupernetModule

    if not os.path.exists(path):
        raise SearchInputError(f"Checkpoint {path} does not exist")
    if os.path.isdir(path):
        raise SearchInputError(f"Checkpoint {path} is a folder; pass a checkpoint file (FSDP2 writes a folder unless "
                               f"ModelParallelStrategy(save_distributed_checkpoint=False))")
    if os.path.getsize(path) == 0:
        raise SearchInputError(f"Checkpoint {path} is empty")
    if not zipfile.is_zipfile(path):
        raise SearchInputError(f"Checkpoint {path} is not a complete PyTorch checkpoint (truncated, or not written "
                               f"by torch.save)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"WeightsUnpickler error: (.*?)\n\n", str(error), re.S)
        raise SearchInputError(f"Checkpoint {path} holds objects other than tensors and plain data, which "
                               f"torch.load(weights_only=True) does not load"
                               + (f": {found.group(1).strip()}" if found else "")) from None
    except Exception as error:  # a damaged archive
        raise SearchInputError(f"Checkpoint {path} is damaged: {type(error).__name__}: {error}") from None
    hparams = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise SearchInputError(f"Checkpoint {path} is not a Lightning checkpoint (no `state_dict`)")
    if "supernet_sampler" not in ckpt or "space" not in hparams:
        what = hparams.get("_class_path") or "hyperparameters: " + (", ".join(sorted(hparams)[:6]) or "none")
        raise SearchInputError(f"Checkpoint {path} is not a SupernetModule checkpoint ({what}); `lit-eff search` "
                               f"needs a checkpoint of `lit-eff fit` with lit_eff.supernet.SupernetModule")
    names = inspect.signature(SupernetModule.__init__).parameters
    module = SupernetModule(**{k: v for k, v in hparams.items() if k in names})
    module.load_state_dict(ckpt["state_dict"])
    return module


def cli(argv: list[str] | None = None) -> None:
    """``lit-eff search --ckpt CKPT --budget-mflops X [options]``; a bad argument or checkpoint
    prints one line and exits with status 2."""
    try:
        run(argv)
    except SearchInputError as error:
        print(f"lit-eff search: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lit-eff search", description=__doc__.split("\n\n")[0],
        epilog="Writes OUT/subnet.pt (load it with lit_eff.supernet.load_subnet('OUT/subnet.pt')), OUT/search.json "
               "and OUT/pareto.png. Subnets are named 'width 48 · depth 2 · heads 2,4 · mlp 2,1.5' (heads and MLP "
               "ratios per block).")
    p.add_argument("--ckpt", required=True, metavar="FILE",
                   help="a checkpoint of a SupernetModule run (e.g. .../checkpoints/last.ckpt)")
    p.add_argument("--budget-mflops", type=float, required=True, metavar="MFLOPS",
                   help="the most forward MFLOPs per sample (one image, one sequence) the chosen subnet may cost")
    p.add_argument("--method", choices=["evolution", "random"], default="evolution",
                   help="evolution: a random population, then crossover and mutation of the best half; "
                        "random: random subnets under the budget (default: %(default)s)")
    p.add_argument("--candidates", type=int, metavar="N", default=48,
                   help="subnets to evaluate in all (default: %(default)s)")
    p.add_argument("--population", type=int, metavar="N", default=12,
                   help="evolution: subnets per generation (default: %(default)s)")
    p.add_argument("--seed", type=int, metavar="N", default=0,
                   help="seed of the candidate draws (default: %(default)s)")
    p.add_argument("--batches", type=int, metavar="N", default=8,
                   help="validation batches each candidate is scored on (default: %(default)s)")
    p.add_argument("--batch-size", type=int, metavar="N", default=128,
                   help="validation batch size (default: %(default)s)")
    p.add_argument("--out", default="search_out", metavar="OUT",
                   help="folder for subnet.pt, search.json and pareto.png (default: %(default)s)")
    return p


def run(argv: list[str] | None = None) -> Result:
    """The search command; returns the chosen subnet. Bad input raises :class:`SearchInputError`."""
    args = parser().parse_args(argv)
    _check_args(args)
    module = load_supernet(args.ckpt)
    budget = args.budget_mflops * 1e6
    try:
        _check_budget(module, budget)
    except ValueError as error:
        raise SearchInputError(str(error)) from None
    dm = _datamodule(module, args.batch_size)
    dm.setup("fit")
    batches = [b for _, b in zip(range(args.batches), dm.val_dataloader())]
    best, results = search(module, batches, budget, args.method, args.candidates, args.population, args.seed)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "subnet.pt")
    save_subnet(module.elastic, best.config, path, name=str(best.config), mflops=best.flops / 1e6,
                metric=best.metric, ckpt=os.path.abspath(args.ckpt))

    def entry(r: Result) -> dict:
        return {"name": str(r.config), **r.config.to_dict(), "mflops": r.flops / 1e6, "metric": r.metric}

    with open(os.path.join(args.out, "search.json"), "w") as f:
        json.dump({"ckpt": args.ckpt, "budget_mflops": args.budget_mflops, "method": args.method, "seed": args.seed,
                   "metric": "val_acc" if module.vision else "val_loss", "best": entry(best),
                   "evaluated": [entry(r) for r in results]}, f, indent=1, ensure_ascii=False)
    plot_pareto(results, best, budget, os.path.join(args.out, "pareto.png"), module.vision)
    name = "acc" if module.vision else "loss"
    print(f"best under {args.budget_mflops:g} MFLOPs: {best.config} at {best.flops / 1e6:.3f} MFLOPs, "
          f"val {name} {best.metric:.4f} ({len(results)} subnets evaluated)\n"
          f"wrote {args.out}/; load the subnet with lit_eff.supernet.load_subnet({path!r})")
    return best


if __name__ == "__main__":
    cli()
