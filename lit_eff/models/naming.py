"""Names that do not depend on a ``torch.compile`` wrapper.

``torch.compile(module)`` returns an ``OptimizedModule`` holding the original as ``_orig_mod``,
so compiling a submodule (``self.model = torch.compile(self.model)``) inserts ``_orig_mod.``
into every name below it: module names (which the kit's techniques use to pick layers and to
seed their random choices) and checkpoint keys. :func:`clean_name` removes it;
:func:`compile_agnostic_state_dict` makes a module save and load the uncompiled keys whether
or not a part of it is compiled, so checkpoints move freely between compiled and eager runs.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

__all__ = ["clean_name", "compile_agnostic_state_dict", "named_modules"]

_WRAPPER = "_orig_mod"


def clean_name(name: str) -> str:
    """``"model._orig_mod.blocks.0"`` -> ``"model.blocks.0"``."""
    if _WRAPPER not in name:
        return name
    return ".".join(part for part in name.split(".") if part != _WRAPPER)


def named_modules(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``module.named_modules()`` with compile-independent names, each module once (the
    ``OptimizedModule`` wrappers themselves are skipped: their ``_orig_mod`` is listed)."""
    from torch._dynamo.eval_frame import OptimizedModule

    for name, sub in module.named_modules():
        if not isinstance(sub, OptimizedModule):
            yield clean_name(name), sub


def _save_clean(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for key in [k for k in state_dict if _WRAPPER in k]:
        state_dict[clean_name(key)] = state_dict.pop(key)


def _load_either(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    actual = {clean_name(prefix + name): prefix + name
              for name, _ in [*module.named_parameters(remove_duplicate=False),
                              *module.named_buffers(remove_duplicate=False)] if _WRAPPER in name}
    if not actual:
        return
    for key in list(state_dict):
        target = actual.get(clean_name(key))
        if target is not None and target != key:
            state_dict[target] = state_dict.pop(key)


def compile_agnostic_state_dict(module: nn.Module) -> nn.Module:
    """Make ``module`` save and load checkpoint keys without ``_orig_mod.`` (in place)."""
    module.register_state_dict_post_hook(_save_clean)
    module.register_load_state_dict_pre_hook(_load_either)
    return module
