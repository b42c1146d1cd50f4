"""Which subnets one training step trains. Every decision draws from
``lit_eff.seeding.generator(run_seed(), step, "supernet", <sampler>)``, so all DDP ranks train the
same subnets without communicating; state (current FLOPs bucket, banks) lives in
``state_dict()`` and travels in the checkpoint.

Chosen in YAML under the SupernetModule::

    sampler:
      class_path: lit_eff.supernet.ComplexityAware
      init_args: {num_buckets: 4, k: 2}
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from lit_eff.seeding import generator, run_seed
from lit_eff.supernet.space import SearchSpace, SubnetConfig
from lit_eff.validation import check_fraction, check_int, check_number


@dataclass
class Draw:
    """One subnet of a step: ``role`` "max" learns from labels (and teaches), "student" distils
    from the max subnet (or learns from labels when the step has none); the loss is scaled by
    ``weight``."""

    config: SubnetConfig
    role: str = "student"
    weight: float = 1.0
    explored: bool = False


def _check_k(k: Any) -> None:
    check_int("k", k, 0)


class SubnetSampler:
    """Base class. ``sample(step)`` returns the step's draws (the same list for every micro-batch
    of one optimizer step); ``observe`` sees each draw's loss after the forward."""

    def __init__(self) -> None:
        self._cached: tuple[int, list[Draw]] | None = None

    def bind(self, space: SearchSpace, flops, total_steps: int) -> None:
        self.space, self.flops, self.total_steps = space, flops, max(1, int(total_steps))
        self._cached = None

    def generator(self, step: int, what: str = "") -> torch.Generator:
        return generator(run_seed(), step, "supernet", type(self).__name__, what)

    def sample(self, step: int) -> list[Draw]:
        if self._cached is None or self._cached[0] != step:
            self._cached = (step, self.draw(step))
        return self._cached[1]

    def draw(self, step: int) -> list[Draw]:
        raise NotImplementedError

    def observe(self, step: int, draws: list[Draw], losses: list[float]) -> None:
        pass

    def reorganize_step(self) -> int | None:
        """The step before which the module sorts the middle weights by importance (None: never)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._cached = None

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items()
                         if not k.startswith("_") and k not in ("space", "flops", "total_steps", "banks", "bucket"))
        return f"{type(self).__name__}({args})"


class Uniform(SubnetSampler):
    """``k`` uniformly random subnets per step, all learning from labels (no teacher), plus the
    largest as teacher if ``include_max``."""

    def __init__(self, k: int = 2, include_max: bool = False) -> None:
        super().__init__()
        _check_k(k)
        if k == 0 and not include_max:
            raise ValueError("Expected `k` >= 1 or `include_max`=True, got k=0, include_max=False: no subnet to train")
        self.k, self.include_max = k, include_max

    def draw(self, step: int) -> list[Draw]:
        gen = self.generator(step)
        head = [Draw(self.space.max(), "max")] if self.include_max else []
        return head + [Draw(self.space.sample(gen)) for _ in range(self.k)]


class Sandwich(SubnetSampler):
    """The sandwich rule: the largest (labels), the smallest and ``k`` random subnets (distilled)."""

    def __init__(self, k: int = 2) -> None:
        super().__init__()
        _check_k(k)
        self.k = k

    def draw(self, step: int) -> list[Draw]:
        gen = self.generator(step)
        return ([Draw(self.space.max(), "max"), Draw(self.space.min())]
                + [Draw(self.space.sample(gen)) for _ in range(self.k)])


class ComplexityAware(SubnetSampler):
    """ElasticViT's complexity-aware sampling: the FLOPs range [min, max] is cut into
    ``num_buckets`` equal buckets; a current bucket moves by -1, 0 or +1 per step (at an edge:
    stay twice as likely, never out), and the ``k`` random subnets of a step come from it
    (rejection sampling, ``tries`` candidates, else the one nearest the bucket). The largest
    (teacher) and smallest subnets are added when ``include_max``/``include_min``."""

    def __init__(self, num_buckets: int = 4, k: int = 2, include_max: bool = True, include_min: bool = True,
                 tries: int = 64) -> None:
        super().__init__()
        check_int("num_buckets", num_buckets, 1)
        _check_k(k)
        check_int("tries", tries, 1)
        self.num_buckets, self.k, self.include_max, self.include_min, self.tries = (
            num_buckets, k, include_max, include_min, tries)
        self.bucket, self._last_step = 0, None

    def bind(self, space, flops, total_steps) -> None:
        super().bind(space, flops, total_steps)
        lo, hi = flops.min(), flops.max()
        self.edges = [lo + (hi - lo) * i / self.num_buckets for i in range(self.num_buckets + 1)]

    def bucket_of(self, cfg: SubnetConfig) -> int:
        f = self.flops(cfg)
        return min(self.num_buckets - 1, sum(f >= e for e in self.edges[1:-1]))

    def move(self, step: int) -> None:
        if self._last_step is not None and step == self._last_step:
            return
        if self._last_step is not None:
            gen = self.generator(step, "move")
            moves = [0, 0, 1] if self.bucket == 0 else [-1, 0, 0] if self.bucket == self.num_buckets - 1 else [-1, 0, 1]
            self.bucket = max(0, min(self.num_buckets - 1, self.bucket + moves[int(torch.randint(3, (1,), generator=gen))]))
        self._last_step = step

    def in_bucket(self, gen: torch.Generator, bucket: int) -> SubnetConfig:
        lo, hi = self.edges[bucket], self.edges[bucket + 1]
        best, gap = None, math.inf
        for _ in range(self.tries):
            cfg = self.space.sample(gen)
            f = self.flops(cfg)
            if lo <= f <= hi:
                return cfg
            d = lo - f if f < lo else f - hi
            if d < gap:
                best, gap = cfg, d
        return best

    def head(self) -> list[Draw]:
        return (([Draw(self.space.max(), "max")] if self.include_max else [])
                + ([Draw(self.space.min())] if self.include_min else []))

    def draw(self, step: int) -> list[Draw]:
        self.move(step)
        gen = self.generator(step)
        return self.head() + [Draw(self.in_bucket(gen, self.bucket)) for _ in range(self.k)]

    def state_dict(self) -> dict[str, Any]:
        return {"bucket": self.bucket, "last_step": self._last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.bucket, self._last_step = int(state["bucket"]), state["last_step"]


class PerformanceAware(ComplexityAware):
    """ElasticViT's performance-aware sampling on top of the bucket walk: each bucket keeps a bank
    of up to ``capacity`` good subnets with their loss. Per random draw, with probability ``q``
    (if the bank is over half full) exploit: pick a bank entry with probability softmax(-loss);
    else explore: take ``candidates`` subnets from the bucket and keep the widest-and-shallowest
    (lowest FLOPs(its depth, anchor's widths) - FLOPs(anchor's depth, its widths), the anchor
    being the best entry of the lowest non-empty bank, else the smallest subnet). An explored
    subnet enters its bucket's bank after its step if there is room or it beats the worst entry;
    an exploited entry's loss is refreshed. Losses are the subnet's cross-entropy on the step's
    batch, averaged over ranks."""

    def __init__(self, num_buckets: int = 4, k: int = 2, q: float = 0.2, capacity: int = 16, candidates: int = 5,
                 include_max: bool = True, include_min: bool = True, tries: int = 64) -> None:
        super().__init__(num_buckets, k, include_max, include_min, tries)
        check_fraction("q", q)
        check_int("capacity", capacity, 1)
        check_int("candidates", candidates, 1)
        self.q, self.capacity, self.candidates = float(q), capacity, candidates
        self.banks: list[list[tuple[SubnetConfig, float]]] = [[] for _ in range(num_buckets)]

    @staticmethod
    def _layers(values: tuple, n: int) -> tuple:
        return tuple(values[min(i, len(values) - 1)] for i in range(n))

    def anchor(self) -> SubnetConfig:
        for bank in self.banks:
            if bank:
                return min(bank, key=lambda e: e[1])[0]
        return self.space.min()

    def shallow_wide_score(self, cfg: SubnetConfig, anchor: SubnetConfig) -> float:
        depth_part = SubnetConfig(anchor.embed_dim, cfg.depth, self._layers(anchor.num_heads, cfg.depth),
                                  self._layers(anchor.mlp_ratio, cfg.depth))
        width_part = SubnetConfig(cfg.embed_dim, anchor.depth, self._layers(cfg.num_heads, anchor.depth),
                                  self._layers(cfg.mlp_ratio, anchor.depth))
        return self.flops(depth_part) - self.flops(width_part)

    def draw(self, step: int) -> list[Draw]:
        self.move(step)
        gen = self.generator(step)
        bank, draws = self.banks[self.bucket], self.head()
        for _ in range(self.k):
            if float(torch.rand((), generator=gen)) < self.q and len(bank) > self.capacity / 2:
                probs = torch.softmax(-torch.tensor([loss for _, loss in bank], dtype=torch.float64), 0)
                draws.append(Draw(bank[int(torch.multinomial(probs, 1, generator=gen))][0]))
            else:
                anchor = self.anchor()
                pool = [self.in_bucket(gen, self.bucket) for _ in range(self.candidates)]
                draws.append(Draw(min(pool, key=lambda c: self.shallow_wide_score(c, anchor)), explored=True))
        return draws

    def observe(self, step: int, draws: list[Draw], losses: list[float]) -> None:
        for draw, loss in zip(draws, losses):
            if draw.role == "max":
                continue
            bank = self.banks[self.bucket_of(draw.config)]
            known = [i for i, (cfg, _) in enumerate(bank) if cfg == draw.config]
            if known:
                bank[known[0]] = (draw.config, float(loss))
            elif draw.explored:
                if len(bank) < self.capacity:
                    bank.append((draw.config, float(loss)))
                else:
                    worst = max(range(len(bank)), key=lambda i: bank[i][1])
                    if loss < bank[worst][1]:
                        bank[worst] = (draw.config, float(loss))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(),
                "banks": [[[cfg.to_dict(), loss] for cfg, loss in bank] for bank in self.banks]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.banks = [[(SubnetConfig.from_dict(c), float(loss)) for c, loss in bank] for bank in state["banks"]]


class DelayedShrinking(SubnetSampler):
    """DεpS: only the full model until ``start_fraction`` of training, then the sandwich rule over
    the whole space at once (max, min, ``k`` random), the non-max subnets' loss (hence gradient)
    weight ramping linearly from 0 to ``multiplier`` over ``warmup_fraction`` of training. With
    ``reorganize`` (the paper's shrink start) the module first sorts every block's MLP units and
    heads by importance (:func:`lit_eff.supernet.reorganize.reorganize_middle_weights`), so the
    small subnets start from the full model's most important units."""

    def __init__(self, start_fraction: float = 0.5, warmup_fraction: float = 0.05, k: int = 2,
                 multiplier: float = 1.0, reorganize: bool = True) -> None:
        super().__init__()
        check_fraction("start_fraction", start_fraction, high_open=True)
        check_fraction("warmup_fraction", warmup_fraction)
        if warmup_fraction > 1.0 - start_fraction:
            raise ValueError(f"Expected `warmup_fraction` in [0, 1 - start_fraction], got "
                             f"warmup_fraction={warmup_fraction!r}, start_fraction={start_fraction!r}")
        _check_k(k)
        check_number("multiplier", multiplier, 0.0, low_open=True)
        if not isinstance(reorganize, bool):
            raise ValueError(f"Expected `reorganize` to be true or false, got reorganize={reorganize!r}")
        self.start_fraction, self.warmup_fraction, self.k, self.multiplier = (
            float(start_fraction), float(warmup_fraction), k, float(multiplier))
        self.reorganize = reorganize

    def reorganize_step(self) -> int | None:
        return self.start_step() if self.reorganize else None

    def start_step(self) -> int:
        return int(self.start_fraction * self.total_steps)

    def beta(self, step: int) -> float:
        start, warm = self.start_step(), int(self.warmup_fraction * self.total_steps)
        if step < start:
            return 0.0
        return self.multiplier * min(1.0, (step - start + 1) / (warm + 1))

    def draw(self, step: int) -> list[Draw]:
        if step < self.start_step():
            return [Draw(self.space.max(), "max")]
        gen, beta = self.generator(step), self.beta(step)
        return ([Draw(self.space.max(), "max"), Draw(self.space.min(), weight=beta)]
                + [Draw(self.space.sample(gen), weight=beta) for _ in range(self.k)])
