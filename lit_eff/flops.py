"""FLOP counting from the real shapes of each call.

Two tools share one definition of a FLOP (PyTorch's ``FlopCounterMode`` formulas: matmuls,
convolutions and attention; 2 FLOPs per multiply-add; backward counted from the ops autograd
really runs):

- :func:`flop_counter` returns a ``FlopCounterMode`` that also knows the CPU fused-attention
  kernels PyTorch's own table misses: the reference the tests hold the tracker to.
- :class:`FlopTracker` counts the code it wraps cheaply. It intercepts only the few
  FLOP-bearing torch functions (``F.linear``, convolutions, matmuls, attention) at the
  ``__torch_function__`` level, counts each distinct call signature once by replaying it
  forward and backward on meta tensors under :func:`flop_counter`, and caches the result.
  :func:`count_flops` counts one call with it (on meta tensors too, for free).
  :class:`~lit_eff.callbacks.FlopsMonitor` runs it on the first training batch of each step
  signature and reuses that count, so compiled steps run untouched.

Attention is counted with PyTorch's fused-kernel formulas (the backward recomputes the
scores), whichever kernel runs.

Sparse-effective FLOPs: a technique that masks a module's weights reports the module's density
with :func:`set_density`; FLOPs executed inside that module then count ``density`` times in
:attr:`FlopTracker.effective` (a 2:4-masked Linear counts half), while
:attr:`FlopTracker.executed` keeps the dense count the hardware ran.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten

__all__ = [
    "FlopCount",
    "FlopTracker",
    "count_flops",
    "flop_counter",
    "get_density",
    "set_density",
    "clear_density",
    "density_version",
    "signature",
]


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


_EXTRA_FORMULAS: dict[Any, Callable[..., int]] = {}
if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _EXTRA_FORMULAS[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flop
    _EXTRA_FORMULAS[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward_flop


def flop_counter(display: bool = False, depth: int | None = None) -> FlopCounterMode:
    """A ``FlopCounterMode`` that also counts the CPU fused-attention kernels."""
    return FlopCounterMode(display=display, depth=depth, custom_mapping=dict(_EXTRA_FORMULAS))


@dataclass
class FlopCount:
    forward: int = 0
    backward: int = 0

    @property
    def total(self) -> int:
        return self.forward + self.backward


def count_flops(fn: Callable[[], Any], backward: bool = True) -> FlopCount:
    """The FLOPs of running ``fn()`` and, if ``backward``, of backpropagating through it.

    Counted by :class:`FlopTracker` (the backward from the ops autograd would run), so the
    count equals what :class:`~lit_eff.callbacks.FlopsMonitor` logs for the same shapes, and
    ``fn`` may build meta-device modules and tensors, which costs no compute::

        with torch.device("meta"):
            model = GPT(n_layer=2)
            idx = torch.zeros(8, 64, dtype=torch.long)
        count_flops(lambda: model(idx)).total
    """
    tracker = FlopTracker()
    with tracker:
        fn()
    forward = tracker.forward_executed
    return FlopCount(forward=forward, backward=tracker.executed - forward if backward else 0)


# ---------------------------------------------------------------------------------------------
# densities reported by sparsity techniques
# ---------------------------------------------------------------------------------------------
_DENSITY: weakref.WeakKeyDictionary[nn.Module, float] = weakref.WeakKeyDictionary()
_DENSITY_VERSION = [0]  # changes whenever any reported density changes


def set_density(module: nn.Module, density: float) -> None:
    """Report that ``module``'s matmuls effectively run at ``density`` (fraction of nonzero weights)."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"Expected `density` in [0, 1], got density={density}")
    if _DENSITY.get(module) != density:
        _DENSITY[module] = float(density)
        _DENSITY_VERSION[0] += 1


def get_density(module: nn.Module) -> float:
    """The density reported for ``module`` (1.0 when no technique reported one)."""
    return _DENSITY.get(module, 1.0)


def clear_density(module: nn.Module) -> None:
    """Forget ``module``'s density (a technique released its mask)."""
    if _DENSITY.pop(module, None) is not None:
        _DENSITY_VERSION[0] += 1


def density_version() -> int:
    """A number that changes whenever a reported density changes (for caches of effective counts)."""
    return _DENSITY_VERSION[0]


# ---------------------------------------------------------------------------------------------
# the tracker
# ---------------------------------------------------------------------------------------------
_TENSOR_METHODS = [torch.Tensor.__matmul__, torch.Tensor.__rmatmul__, torch.Tensor.matmul,
                   torch.Tensor.mm, torch.Tensor.bmm, torch.Tensor.addmm, torch.Tensor.baddbmm]
_REPLAYED: set[Any] = {
    F.linear, F.bilinear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
    F.conv_transpose3d, torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.baddbmm, torch.addbmm,
    torch.einsum, *_TENSOR_METHODS,
}
_SDPA = F.scaled_dot_product_attention
_COUNTED = frozenset(_REPLAYED | {_SDPA})
_TENSOR_TYPES = (torch.Tensor, nn.Parameter)


def _meta_like(value: Any, grad: bool) -> Any:
    if isinstance(value, torch.Tensor):
        # FLOPs do not depend on the float dtype; one dtype for all replays autocast's mixed calls
        dtype = torch.float32 if value.is_floating_point() else value.dtype
        meta = torch.empty(value.shape, dtype=dtype, device="meta")
        if grad and value.requires_grad and (value.is_floating_point() or value.is_complex()):
            meta.requires_grad_(True)
        return meta
    if isinstance(value, (list, tuple)):
        return type(value)(_meta_like(v, grad) for v in value)
    return value


def signature(value: Any) -> Any:
    """A hashable description of the shapes in ``value`` (tensors, nested lists, tuples, dicts)."""
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.dtype, value.requires_grad)
    if isinstance(value, (list, tuple)):
        return tuple(signature(v) for v in value)
    if isinstance(value, dict):
        return tuple((k, signature(v)) for k, v in value.items())
    if isinstance(value, (int, float, bool, str, type(None))):
        return value
    return type(value).__name__


def _replay(func: Any, args: tuple, kwargs: dict, grad: bool) -> FlopCount:
    """Count one call by replaying it forward and backward on meta tensors, in a fresh thread:
    autograd's thread-local state (an activation-checkpointing region's saved-tensor hooks, an
    outer ``FlopCounterMode``, autocast) must not see or disturb the replay."""
    result: list[Any] = []

    def work() -> None:
        try:
            result.append(_replay_on_meta(func, args, kwargs, grad))
        except BaseException as error:  # re-raised in the calling thread
            result.append(error)

    thread = threading.Thread(target=work, name="lit_eff-flop-replay")
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def _replay_on_meta(func: Any, args: tuple, kwargs: dict, grad: bool) -> FlopCount:
    meta_args = _meta_like(args, grad)
    meta_kwargs = {k: _meta_like(v, grad) for k, v in kwargs.items()}
    counter = flop_counter()
    with counter:
        out = func(*meta_args, **meta_kwargs)
    forward = counter.get_total_flops()
    outs = [o for o in (out if isinstance(out, (tuple, list)) else [out])
            if isinstance(o, torch.Tensor) and o.requires_grad]
    if not outs:
        return FlopCount(forward, 0)
    with counter:  # entering the counter clears its previous counts
        torch.autograd.backward(outs, [torch.empty_like(o) for o in outs])
    return FlopCount(forward, counter.get_total_flops())


def _sdpa_count(args: tuple, kwargs: dict, grad: bool) -> FlopCount:
    names = ("query", "key", "value")
    q, k, v = (args[i] if i < len(args) else kwargs[n] for i, n in enumerate(names))
    forward = sdpa_flop_count(q.shape, k.shape, v.shape)
    needs_grad = grad and any(t.requires_grad for t in (q, k, v))
    backward = sdpa_backward_flop_count(q.shape, q.shape, k.shape, v.shape) if needs_grad else 0
    return FlopCount(forward, backward)


def _in_backward() -> bool:
    """Inside the autograd engine: an activation-checkpointing recompute, a Python backward."""
    return torch._C._current_graph_task_id() != -1


class FlopTracker(TorchFunctionMode):
    """Counts executed and sparse-effective FLOPs (forward + backward) of the code it wraps.

    Each counted call adds its forward FLOPs and the FLOPs of its backward (from the ops autograd
    would run for it), so the backward is counted when the forward runs and calls made by the
    autograd engine itself (an activation-checkpointing recompute) are not counted again.

    >>> tracker = FlopTracker()
    >>> with tracker:
    ...     y = torch.nn.functional.linear(torch.randn(4, 8), torch.randn(16, 8))
    >>> tracker.executed
    1024

    ``tracker.inside`` maps each module with a reported density to the executed FLOPs counted
    inside it, so a cached count can be re-weighted when densities change.
    """

    def __init__(self) -> None:
        super().__init__()
        self._cache: dict[Any, FlopCount] = {}
        self._density_stack: list[tuple[nn.Module | None, float]] = [(None, 1.0)]
        self._handles: list = []
        self.reset()

    def reset(self) -> None:
        self.executed = 0
        self.effective = 0.0
        self.forward_executed = 0
        self.inside: dict[int, list] = {}  # id(module) -> [weakref(module), executed FLOPs]

    # module densities: hooked only while the tracker is active --------------------------------
    def __enter__(self):
        for module in list(_DENSITY.keys()):
            self._handles.append(module.register_forward_pre_hook(self._push_density))
            self._handles.append(module.register_forward_hook(self._pop_density, always_call=True))
        return super().__enter__()

    def __exit__(self, exc_type, exc_value, traceback):
        try:
            return super().__exit__(exc_type, exc_value, traceback)
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles = []
            del self._density_stack[1:]

    def _push_density(self, module: nn.Module, args: Any) -> None:
        if not _in_backward():
            self._density_stack.append((module, _DENSITY.get(module, 1.0)))

    def _pop_density(self, module: nn.Module, args: Any, output: Any) -> None:
        if len(self._density_stack) > 1 and self._density_stack[-1][0] is module:
            self._density_stack.pop()

    # interception -----------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs is None:
            kwargs = {}
        if func in _COUNTED and not _in_backward():
            grad = torch.is_grad_enabled()
            # the fast path: flat tensor arguments (F.linear, convolutions, matmuls, attention)
            key = (func, grad, *[(a.shape, a.requires_grad) if type(a) in _TENSOR_TYPES else signature(a)
                                 for a in args])
            if kwargs:
                key = (key, signature(tuple(sorted(kwargs.items()))))
            count = self._cache.get(key)
            if count is None:
                count = _sdpa_count(args, kwargs, grad) if func is _SDPA else _replay(func, args, kwargs, grad)
                self._cache[key] = count
            total = count.total
            self.executed += total
            self.forward_executed += count.forward
            module, density = self._density_stack[-1]
            self.effective += total * density
            if module is not None:
                entry = self.inside.get(id(module))
                if entry is None:
                    self.inside[id(module)] = [weakref.ref(module), total]
                else:
                    entry[1] += total
        return func(*args, **kwargs)
