"""Which layers a sparsity technique masks: layer kinds plus ``include``/``exclude`` name globs.

Names are ``model.named_modules()`` names without ``torch.compile``'s ``_orig_mod.`` (so masks,
seeds and checkpoint keys do not depend on compiling), matched with
:func:`fnmatch.fnmatchcase` (``*`` matches dots too). By default the Linear layers inside
transformer blocks are targeted (``*blocks.*``): attention and MLP projections of a timm ViT or
the kit's GPT, while the patch embedding, token/position embeddings and classifier or LM head
stay dense. ``kinds=["conv"]`` (or both) targets convolutions too.

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


def _named_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from lit_eff.models.naming import named_modules  # (lit_eff.models imports lit_eff.sparsity)

    return list(named_modules(model))


def _kind_of(module: nn.Module) -> str | None:
    return next((kind for kind, types in LAYER_KINDS.items() if isinstance(module, types)), None)


def _shown(names: list[str]) -> str:
    return ", ".join(names[:_SHOWN]) + (f", ... ({len(names)} in all)" if len(names) > _SHOWN else "")


def _tied_elsewhere(model: nn.Module) -> dict[int, list[str]]:
    """Parameter id -> every ``module.param`` name holding it."""
    from lit_eff.models.naming import clean_name

    holders: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        module_name = clean_name(module_name)
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

    modules = _named_modules(model)
    matched = [(name, module) for name, module in modules
               if any(fnmatchcase(name, p) for p in include_patterns)
               and not any(fnmatchcase(name, p) for p in exclude_patterns)]
    targets = {name: module for name, module in matched if isinstance(module, types)}
    if not targets:
        other = [name for name, module in matched if _kind_of(module) is not None]
        if other:
            kinds_there = sorted({_kind_of(module) for _, module in matched if _kind_of(module) is not None})
            raise ValueError(f"include={include_patterns} exclude={exclude_patterns} matched only {'/'.join(kinds_there)} "
                             f"layers ({_shown(other)}), and only {'/'.join(kind_names)} layers are masked: add "
                             f"{kinds_there} to the layer kinds (the sparsity callbacks' `layers` argument, e.g. "
                             f"layers: [linear, conv]) to mask them")
        existing = [name for name, module in modules if _kind_of(module) is not None]
        if not existing:
            raise ValueError(f"{type(model).__name__} has no Linear or Conv layers to make sparse")
        raise ValueError(f"No {'/'.join(kind_names)} layer matched include={include_patterns} "
                         f"exclude={exclude_patterns}; Linear/Conv layers in the model: {_shown(existing)}")

    holders = _tied_elsewhere(model)
    for name, module in targets.items():
        weight = module._parameters.get("weight")
        others = [h for h in holders.get(id(weight), []) if h != f"{name}.weight"] if weight is not None else []
        if others:
            raise ValueError(f"`{name}.weight` is tied to {', '.join(others)}; a mask on a tied weight would "
                             f"sparsify both uses. Exclude `{name}` (exclude=[{name!r}])")
    return targets
