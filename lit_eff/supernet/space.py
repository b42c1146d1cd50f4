"""The search space of an elastic transformer and one point in it (:class:`SubnetConfig`).

Declared in YAML as choice lists (or ``{min, max, step}`` ranges)::

    space:
      embed_dim: [32, 48, 64]
      depth: [2, 3, 4]
      num_heads: [2, 3, 4]        # per layer; head_dim = max(embed_dim) / max(num_heads), fixed
      mlp_ratio: [1.0, 1.5, 2.0]  # per layer
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

DIMS = ("embed_dim", "depth", "num_heads", "mlp_ratio")


@dataclass(frozen=True)
class SubnetConfig:
    """One subnet: a width, a depth, and per-layer heads and MLP ratios (``depth`` entries each)."""

    embed_dim: int
    depth: int
    num_heads: tuple[int, ...]
    mlp_ratio: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "num_heads", tuple(int(h) for h in self.num_heads))
        object.__setattr__(self, "mlp_ratio", tuple(float(r) for r in self.mlp_ratio))
        if len(self.num_heads) != self.depth or len(self.mlp_ratio) != self.depth:
            raise ValueError(f"Expected `num_heads` and `mlp_ratio` to have `depth`={self.depth} entries, got "
                             f"num_heads={list(self.num_heads)}, mlp_ratio={list(self.mlp_ratio)}")

    def hidden(self, layer: int) -> int:
        """The MLP hidden width of ``layer``."""
        return int(round(self.embed_dim * self.mlp_ratio[layer]))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {**d, "num_heads": list(d["num_heads"]), "mlp_ratio": list(d["mlp_ratio"])}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SubnetConfig:
        return cls(int(d["embed_dim"]), int(d["depth"]), tuple(d["num_heads"]), tuple(d["mlp_ratio"]))

    def __str__(self) -> str:
        """``width 48 · depth 2 · heads 2,4 · mlp 2,1.5``: per-block heads and MLP ratios in block order."""
        return (f"width {self.embed_dim} · depth {self.depth} · heads {','.join(map(str, self.num_heads))} · "
                f"mlp {','.join(f'{r:g}' for r in self.mlp_ratio)}")


def _choices(name: str, value: Any) -> list:
    """A strictly increasing, non-empty list of positive numbers from a list or a {min, max, step} range."""
    if isinstance(value, dict):
        unknown = set(value) - {"min", "max", "step"}
        if unknown or not {"min", "max"} <= set(value):
            raise ValueError(f"Expected `{name}` as a list or {{min, max, step}}, got {name}={value}")
        lo, hi, step = value["min"], value["max"], value.get("step", 1)
        if lo > hi:
            raise ValueError(f"Expected `{name}.min` <= `{name}.max`, got min={lo}, max={hi}")
        if step <= 0:
            raise ValueError(f"Expected `{name}.step` > 0, got step={step}")
        values, x = [], lo
        while x <= hi + 1e-9:
            values.append(round(x, 6) if isinstance(x, float) else x)
            x += step
        value = values
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"Expected `{name}` to be a non-empty list of choices, got {name}={value!r}")
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 for v in value):
        raise ValueError(f"Expected `{name}` to hold positive numbers, got {name}={list(value)}")
    if any(b <= a for a, b in zip(value, value[1:])):
        raise ValueError(f"Expected `{name}` to be strictly increasing, got {name}={list(value)}")
    if name != "mlp_ratio" and any(int(v) != v for v in value):
        raise ValueError(f"Expected `{name}` to hold integers, got {name}={list(value)}")
    return [float(v) for v in value] if name == "mlp_ratio" else [int(v) for v in value]


class SearchSpace:
    """Choice lists for each elastic dimension; validates them, samples, checks membership."""

    def __init__(self, embed_dim: Any, depth: Any, num_heads: Any, mlp_ratio: Any) -> None:
        self.embed_dim = _choices("embed_dim", embed_dim)
        self.depth = _choices("depth", depth)
        self.num_heads = _choices("num_heads", num_heads)
        self.mlp_ratio = _choices("mlp_ratio", mlp_ratio)
        d_max, h_max = self.embed_dim[-1], self.num_heads[-1]
        if d_max % h_max:
            raise ValueError(f"Expected the largest `num_heads` to divide the largest `embed_dim` (head_dim is "
                             f"fixed at their ratio), got embed_dim={d_max}, num_heads={h_max}")
        self.head_dim = d_max // h_max

    @classmethod
    def from_dict(cls, space: dict[str, Any] | SearchSpace) -> SearchSpace:
        if isinstance(space, SearchSpace):
            return space
        missing = [d for d in DIMS if d not in space]
        unknown = [k for k in space if k not in DIMS]
        if missing or unknown:
            raise ValueError(f"Expected `space` with keys {list(DIMS)}, got {sorted(space)}"
                             + (f" (missing {missing})" if missing else "") + (f" (unknown {unknown})" if unknown else ""))
        return cls(**{d: space[d] for d in DIMS})

    def to_dict(self) -> dict[str, list]:
        return {d: list(getattr(self, d)) for d in DIMS}

    def max(self) -> SubnetConfig:
        L = self.depth[-1]
        return SubnetConfig(self.embed_dim[-1], L, (self.num_heads[-1],) * L, (self.mlp_ratio[-1],) * L)

    def min(self) -> SubnetConfig:
        L = self.depth[0]
        return SubnetConfig(self.embed_dim[0], L, (self.num_heads[0],) * L, (self.mlp_ratio[0],) * L)

    def sample(self, gen: torch.Generator) -> SubnetConfig:
        """A uniformly random subnet (each choice independent), drawn from ``gen``."""
        def pick(choices: list, n: int = 1) -> list:
            return [choices[i] for i in torch.randint(len(choices), (n,), generator=gen).tolist()]

        d, L = pick(self.embed_dim)[0], pick(self.depth)[0]
        return SubnetConfig(d, L, tuple(pick(self.num_heads, L)), tuple(pick(self.mlp_ratio, L)))

    def check(self, cfg: SubnetConfig) -> None:
        """Raise if ``cfg`` is not a point of this space."""
        bad = []
        if cfg.embed_dim not in self.embed_dim:
            bad.append(f"embed_dim={cfg.embed_dim} not in {self.embed_dim}")
        if cfg.depth not in self.depth:
            bad.append(f"depth={cfg.depth} not in {self.depth}")
        if any(h not in self.num_heads for h in cfg.num_heads):
            bad.append(f"num_heads={list(cfg.num_heads)} not all in {self.num_heads}")
        if any(r not in self.mlp_ratio for r in cfg.mlp_ratio):
            bad.append(f"mlp_ratio={list(cfg.mlp_ratio)} not all in {self.mlp_ratio}")
        if bad:
            raise ValueError(f"Expected a subnet inside the search space, got {cfg}: {'; '.join(bad)}")

    def __repr__(self) -> str:
        return f"SearchSpace({self.to_dict()}, head_dim={self.head_dim})"
