"""Which layers a sparsity technique masks: layer kinds plus ``include``/``exclude`` name globs.

Names are ``model.named_modules()`` names matched with :func:`fnmatch.fnmatchcase` (``*``
matches dots too). By default the Linear layers inside transformer blocks are targeted
(``*blocks.*``): attention and MLP projections of a timm ViT or the kit's GPT, while the patch
embedding, token/position embeddings and classifier or LM head stay dense.

>>> from lit_eff.models import GPT
>>> list(find_targets(GPT(n_layer=1)))
['blocks.0.attn.qkv', 'blocks.0.attn.proj', 'blocks.0.mlp.fc1', 'blocks.0.mlp.fc2']
>>> list(find_targets(GPT(n_layer=1), include=["*mlp.*"], exclude=["*fc2"]))
['blocks.0.mlp.fc1']
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

from torch import nn

__all__ = ["DEFAULT_INCLUDE", "LAYER_KINDS", "find_targets"]

DEFAULT_INCLUDE = ("*blocks.*",)
LAYER_KINDS: dict[str, tuple[type[nn.Module], ...]] = {
    "linear": (nn.Linear,),
    "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d),
}
_SHOWN = 12  # layer names listed in an error


def _as_patterns(value: str | Sequence[str] | None, name: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    patterns = list(value)
    if not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"Expected `{name}` to be a list of name patterns (strings), got {name}={value!r}")
    return patterns


def _layer_names(model: nn.Module) -> list[str]:
    kinds = tuple(t for types in LAYER_KINDS.values() for t in types)
    return [name for name, module in model.named_modules() if isinstance(module, kinds)]


def _tied_elsewhere(model: nn.Module) -> dict[int, list[str]]:
    """Parameter id -> every ``module.param`` name holding it."""
    holders: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module._parameters.items():
            if param is not None:
                holders.setdefault(id(param), []).append(f"{module_name}.{param_name}".lstrip("."))
    return holders


def find_targets(model: nn.Module, include: str | Sequence[str] | None = None,
                 exclude: str | Sequence[str] | None = None,
                 kinds: str | Sequence[str] = ("linear",)) -> dict[str, nn.Module]:
    """The layers to mask, by name, in ``model.named_modules()`` order.

    A layer is targeted when it is one of ``kinds`` (``"linear"``, ``"conv"``), its name matches
    an ``include`` pattern (default :data:`DEFAULT_INCLUDE`) and no ``exclude`` pattern.
    Raises ``ValueError`` when nothing matches (listing existing layers) and when a target's
    weight is tied to another module's parameter (the GPT head shares the token embedding).
    """
    kind_names = _as_patterns(kinds, "kinds")
    unknown = [k for k in kind_names if k not in LAYER_KINDS]
    if unknown or not kind_names:
        raise ValueError(f"Expected `kinds` from {sorted(LAYER_KINDS)}, got kinds={kind_names}")
    types = tuple(t for k in kind_names for t in LAYER_KINDS[k])
    include_patterns = _as_patterns(include, "include") if include is not None else list(DEFAULT_INCLUDE)
    exclude_patterns = _as_patterns(exclude, "exclude")

    targets = {
        name: module for name, module in model.named_modules()
        if isinstance(module, types)
        and any(fnmatchcase(name, p) for p in include_patterns)
        and not any(fnmatchcase(name, p) for p in exclude_patterns)
    }
    if not targets:
        existing = _layer_names(model)
        if not existing:
            raise ValueError(f"{type(model).__name__} has no Linear or Conv layers to make sparse")
        shown = ", ".join(existing[:_SHOWN]) + (f", ... ({len(existing)} in all)" if len(existing) > _SHOWN else "")
        raise ValueError(f"No {'/'.join(kind_names)} layer matched include={include_patterns} "
                         f"exclude={exclude_patterns}; Linear/Conv layers in the model: {shown}")

    holders = _tied_elsewhere(model)
    for name, module in targets.items():
        weight = module._parameters.get("weight")
        others = [h for h in holders.get(id(weight), []) if h != f"{name}.weight"] if weight is not None else []
        if others:
            raise ValueError(f"`{name}.weight` is tied to {', '.join(others)}; a mask on a tied weight would "
                             f"sparsify both uses. Exclude `{name}` (exclude=[{name!r}])")
    return targets
