"""Sparse Iso-FLOP Transformations (Sparse-IFT, Saxena et al., ICML 2024): replace dense layers by
larger layers that, trained at sparsity ``s``, spend the dense layers' FLOPs.

- ``"wide"``: an MLP's hidden width ``h`` becomes ``round(h / (1 - s))``; ``fc1`` (d -> h) and
  ``fc2`` (h -> d) each hold ``1 / (1 - s)`` times the weights, so at density ``1 - s`` each
  costs what the dense one did.
- ``"parallel"``: a Linear becomes :class:`ParallelLinear`, ``b = 1 / (1 - s)`` (an integer)
  Linear branches of the same shape, summed; each at density ``1 / b``.

The masks themselves come from a sparsity callback (``DynamicSparsity``, as the paper trains with
RigL) on the returned layers. Card: docs/techniques/sparse_ift.md.

>>> from lit_eff.models import GPT
>>> gpt = GPT(n_layer=1, n_embd=32, n_head=2)
>>> sorted(sparse_ift(gpt, "wide", 0.75))
['blocks.0.mlp.fc1', 'blocks.0.mlp.fc2']
>>> gpt.blocks[0].mlp.fc1
Linear(in_features=32, out_features=512, bias=True)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from lit_eff import validation
from lit_eff.sparsity.targets import find_targets

__all__ = ["DEFAULT_MLP", "TRANSFORMS", "ParallelLinear", "branch_count", "check_ift", "ift_linears",
           "restore_structure", "sparse_ift", "transformed", "wide_hidden"]

#: fc1/fc2 of the MLP in every block of a timm ViT or the kit's GPT.
DEFAULT_MLP = ("*blocks.*.mlp.fc1", "*blocks.*.mlp.fc2")
TRANSFORMS = ("wide", "parallel")
_MARK = "sparse_ift"  # attribute set on a transformed MLP / ParallelLinear: "wide x4", "parallel x2"


class ParallelLinear(nn.Module):
    """``y = Σ_i x W_iᵀ + bias``: ``b`` bias-free Linear branches of one shape, summed, and one bias.

    Each branch is a plain ``nn.Linear`` (``branches.<i>``), so a sparsity callback masks it."""

    def __init__(self, in_features: int, out_features: int, branches: int, bias: bool = True,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        validation.check_int("branches", branches, minimum=1)
        self.in_features, self.out_features = in_features, out_features
        self.branches = nn.ModuleList(nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype)
                                      for _ in range(branches))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.branches[0](x)
        for branch in self.branches[1:]:
            y = y + branch(x)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


# --- arguments ----------------------------------------------------------------------------------
def check_ift(transform: str, sparsity: float) -> None:
    """Raise ``ValueError`` for an unknown ``transform``, a ``sparsity`` outside (0, 1), or (parallel)
    a sparsity whose ``1 / (1 - s)`` is not a whole number of branches."""
    validation.check_choice("transform", transform, TRANSFORMS)
    validation.check_number("sparsity", sparsity, 0.0, 1.0, low_open=True, high_open=True)
    if transform == "parallel":
        branch_count(sparsity)


def branch_count(sparsity: float) -> int:
    """``b = 1 / (1 - s)`` parallel branches, each at density ``1 / b``; raises unless it is an integer."""
    b = 1.0 / (1.0 - sparsity)
    if abs(b - round(b)) > 1e-6:
        raise ValueError(f"Expected `sparsity` with 1 / (1 - sparsity) a whole number of branches for "
                         f"transform='parallel' (e.g. 0.5: 2 branches, 0.75: 4, 0.9: 10), got sparsity={sparsity} "
                         f"(1 / (1 - sparsity) = {b:.4g})")
    return round(b)


def wide_hidden(hidden: int, sparsity: float) -> int:
    """The hidden width of Sparse Wide: ``round(hidden / (1 - s))``."""
    return round(hidden / (1.0 - sparsity))


# --- the transformation -------------------------------------------------------------------------
def _draw_like(old: torch.Tensor, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A new tensor of ``shape`` drawn from N(0, std(old)²): the init both model families use
    (timm ViT and the kit's GPT: normal weights of a fixed std per layer, zero biases)."""
    std = float(old.detach().float().std()) if old.numel() > 1 else 0.0
    return (torch.randn(shape, generator=gen) * std).to(device=old.device, dtype=old.dtype)


def _new_linear(old: nn.Linear, n_in: int, n_out: int, gen: torch.Generator) -> nn.Linear:
    new = nn.Linear(n_in, n_out, bias=old.bias is not None, device="meta")
    new.weight = nn.Parameter(_draw_like(old.weight, (n_out, n_in), gen))
    if old.bias is not None:
        new.bias = nn.Parameter(_draw_like(old.bias, (n_out,), gen))
    return new


def _modules(model: nn.Module) -> dict[str, nn.Module]:
    from lit_eff.models.naming import named_modules  # (lit_eff.models imports lit_eff.sparsity)

    return dict(named_modules(model))


def _mlp_of(name: str, modules: dict[str, nn.Module]) -> tuple[str, nn.Module]:
    """The MLP (parent with Linear ``fc1`` -> elementwise -> Linear ``fc2``) that layer ``name`` is in."""
    parent_name, _, child = name.rpartition(".")
    parent = modules.get(parent_name)
    fc1, fc2 = getattr(parent, "fc1", None), getattr(parent, "fc2", None)
    if child not in ("fc1", "fc2") or not isinstance(fc1, nn.Linear) or not isinstance(fc2, nn.Linear):
        raise ValueError(f"transform='wide' widens the hidden width between `fc1` and `fc2` of an MLP, and "
                         f"`{name}` is not the fc1/fc2 Linear of one; include only MLP layers (default "
                         f"{list(DEFAULT_MLP)}) or use transform='parallel', which takes any Linear")
    if fc1.out_features != fc2.in_features:
        raise ValueError(f"`{parent_name}` has fc1 -> {fc1.out_features} features but fc2 <- {fc2.in_features} "
                         f"(a gated MLP?): transform='wide' needs fc1's outputs to feed fc2 one to one")
    norm = getattr(parent, "norm", None)
    if norm is not None and not isinstance(norm, nn.Identity):
        raise ValueError(f"`{parent_name}.norm` ({type(norm).__name__}) normalizes the hidden width, which "
                         f"transform='wide' does not widen; use transform='parallel' for this MLP")
    return parent_name, parent


def sparse_ift(model: nn.Module, transform: str, sparsity: float, include: Sequence[str] | None = None,
               exclude: Sequence[str] | None = None,
               generator_for: Callable[[str], torch.Generator] | None = None) -> dict[str, nn.Module]:
    """Apply ``transform`` at ``sparsity`` (in place) to the ``nn.Linear`` layers matching ``include``
    (default :data:`DEFAULT_MLP`) and no ``exclude`` glob; returns ``{name: new module}`` (the new
    fc1/fc2 Linears, or the :class:`ParallelLinear` layers). New weights are drawn from
    ``generator_for(name)`` with the std of the weights they replace; see :func:`ift_linears`
    for the layers to mask at ``sparsity``."""
    check_ift(transform, sparsity)
    modules = _modules(model)
    done_before = next(((n, getattr(m, _MARK)) for n, m in modules.items() if hasattr(m, _MARK)), None)
    if done_before is not None:
        raise ValueError(f"`{done_before[0]}` is already Sparse-IFT transformed ({done_before[1]}): apply the "
                         f"transformation once")
    layers = find_targets(model, include=list(DEFAULT_MLP) if include is None else include, exclude=exclude)
    gen = generator_for or (lambda name: torch.Generator().manual_seed(0))
    done: dict[str, nn.Module] = {}
    if transform == "parallel":
        b = branch_count(sparsity)
        for name, old in layers.items():
            new = _parallel(old, b, gen(name))
            _set(modules, name, new)
            done[name] = new
        return done
    mlps = {}
    for name in layers:
        parent_name, parent = _mlp_of(name, modules)
        mlps.setdefault(parent_name, (parent, []))[1].append(name)
    for parent_name, (parent, names) in mlps.items():
        if len(names) != 2:
            missing = f"{parent_name}.fc2" if names[0].endswith("fc1") else f"{parent_name}.fc1"
            raise ValueError(f"transform='wide' widens fc1 and fc2 of an MLP together, and `{names[0]}` matched "
                             f"but `{missing}` did not: include both (or exclude both)")
        hidden = wide_hidden(parent.fc1.out_features, sparsity)
        g = gen(parent_name)
        fc1, fc2 = parent.fc1, parent.fc2
        parent.fc1 = _new_linear(fc1, fc1.in_features, hidden, g)
        parent.fc2 = _new_linear(fc2, hidden, fc2.out_features, g)
        setattr(parent, _MARK, f"wide x{hidden / fc1.out_features:g}")
        done[f"{parent_name}.fc1"], done[f"{parent_name}.fc2"] = parent.fc1, parent.fc2
    return done


def _parallel(old: nn.Linear, b: int, gen: torch.Generator) -> ParallelLinear:
    new = ParallelLinear(old.in_features, old.out_features, b, bias=old.bias is not None, device="meta")
    for branch in new.branches:
        branch.weight = nn.Parameter(_draw_like(old.weight, tuple(old.weight.shape), gen))
    if old.bias is not None:
        new.bias = nn.Parameter(old.bias.detach().clone())
    setattr(new, _MARK, f"parallel x{b}")
    return new


def _set(modules: dict[str, nn.Module], name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(modules[parent_name], child, new)


def transformed(model: nn.Module) -> tuple[str, float, dict[str, nn.Module]] | None:
    """``(transform, factor, layers)`` of a model :func:`sparse_ift` (or :func:`restore_structure`)
    already transformed, ``layers`` as :func:`sparse_ift` returns them; ``None`` for an untouched model."""
    found: list[tuple[str, float, dict[str, nn.Module]]] = []
    for name, module in _modules(model).items():
        if hasattr(module, _MARK):
            kind, factor = getattr(module, _MARK).split(" x")
            layers = {name: module} if kind == "parallel" else {f"{name}.fc1": module.fc1, f"{name}.fc2": module.fc2}
            found.append((kind, float(factor), layers))
    if not found:
        return None
    return found[0][0], found[0][1], {name: layer for *_, layers in found for name, layer in layers.items()}


def ift_linears(layers: dict[str, nn.Module]) -> dict[str, nn.Linear]:
    """The Linear layers among :func:`sparse_ift`'s result that must be masked at its sparsity:
    the wide fc1/fc2 themselves, or each branch of a :class:`ParallelLinear`."""
    out: dict[str, nn.Linear] = {}
    for name, layer in layers.items():
        if isinstance(layer, ParallelLinear):
            out.update({f"{name}.branches.{i}": branch for i, branch in enumerate(layer.branches)})
        else:
            out[name] = layer
    return out


# --- loading a transformed model's weights into an untransformed model --------------------------
def _weight_key(keys: dict[str, str], name: str) -> str | None:
    """The state-dict key of ``name``'s weight, plain or masked (parametrized)."""
    for suffix in (".weight", ".parametrizations.weight.original"):
        if name + suffix in keys:
            return keys[name + suffix]
    return None


def restore_structure(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """``load_state_dict`` pre-hook: give ``module`` the Sparse-IFT structure the state dict holds
    (wider MLPs, parallel branches) before the weights load, e.g. in the main process after a
    ``ddp_spawn`` fit. The kit's LightningModules register it; for your own::

        model.register_load_state_dict_pre_hook(restore_structure)
    """
    from lit_eff.models.naming import clean_name

    keys = {clean_name(k[len(prefix):]): k for k in state_dict if k.startswith(prefix)}
    modules: dict[str, tuple[str, nn.Module]] = {}
    for name, sub in module.named_modules():
        modules.setdefault(clean_name(name), (name, sub))
    changed: list[tuple[str, str]] = []  # (clean name, module name) of restructured modules
    for clean, (name, sub) in list(modules.items()):
        if isinstance(sub, nn.Linear):
            count = len({k[len(clean) + 10:].split(".")[0] for k in keys if k.startswith(clean + ".branches.")})
            if count and _weight_key(keys, f"{clean}.branches.0") is not None:
                new = ParallelLinear(sub.in_features, sub.out_features, count, bias=clean + ".bias" in keys,
                                     device=sub.weight.device, dtype=sub.weight.dtype)
                parent_clean, _, child = clean.rpartition(".")
                setattr(modules[parent_clean][1], child, new)
                setattr(new, _MARK, f"parallel x{count}")
                changed.append((clean, name))
        fc1, fc2 = getattr(sub, "fc1", None), getattr(sub, "fc2", None)
        key = _weight_key(keys, f"{clean}.fc1") if isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear) else None
        # wider only: a narrower hidden layer is another technique's (structured pruning shrinks it)
        if key is not None and state_dict[key].shape[0] > fc1.out_features:
            hidden, like = state_dict[key].shape[0], dict(device=fc1.weight.device, dtype=fc1.weight.dtype)
            sub.fc1 = nn.Linear(fc1.in_features, hidden, bias=fc1.bias is not None, **like)
            sub.fc2 = nn.Linear(hidden, fc2.out_features, bias=fc2.bias is not None, **like)
            setattr(sub, _MARK, f"wide x{hidden / fc1.out_features:g}")
            changed.append((clean, name))
    for clean, name in changed:  # a compiled submodule: its new tensors load under the module's own names
        if clean != name:
            for key in [k for k in keys if k.startswith(clean + ".")]:
                if keys[key] in state_dict and keys[key] == prefix + key:
                    state_dict[prefix + name + key[len(clean):]] = state_dict.pop(keys[key])
