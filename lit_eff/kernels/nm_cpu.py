"""N:M masks and the SR-STE term on CPU by a small C kernel: one pass over a weight each.

Recomputing N:M masks after every optimizer step is most of what N:M training adds to a CPU
step. In torch ops it takes a dozen passes over the weights plus copies into the mask buffers;
:func:`nm_keep_` reads each weight once and, in the same pass, updates the mask and its
``mask − 1`` floats (the buffers of :class:`lit_eff.sparsity.Mask`) where the mask changes only:
from one optimizer step to the next few entries do, so the buffers are mostly read, not written
back to memory. Same rule as :func:`lit_eff.sparsity.nm_mask`: the ``n`` largest ``|w|`` of
every ``m`` consecutive input weights, ties to the lower index, NaN lowest. :func:`add_pruned_`
adds SR-STE's ``λ(1 − E) ⊙ W`` to a gradient reading the bool mask rather than its floats.

The kernel (``nm_cpu.c``) is compiled with the system C compiler (``$CC``, e.g. ``ccache gcc``,
else ``cc``, ``gcc`` or ``clang``) on first use and cached in ``$LIT_EFF_CACHE`` (default ``~/.cache/lit_eff``),
keyed by source, compiler and CPU. Without a compiler a warning says so and the torch ops are
used; ``LIT_EFF_NATIVE=0`` turns the kernel off. It serves float32 weights on CPU (N:M masks:
Linear-shaped ones); other weights (CUDA, half precision, convolutions, FSDP2 shards) use the torch ops.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

__all__ = ["add_pruned_", "native_available", "nm_keep_"]

_SOURCE = Path(__file__).with_name("nm_cpu.c")


def _compiler() -> str | None:
    return os.environ.get("CC") or next(filter(None, map(shutil.which, ("cc", "gcc", "clang"))), None)


def _cpu() -> str:
    try:  # the instruction sets `-march=native` builds for, so a shared cache never mixes machines
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return f"{platform.machine()} {flags}"


def _build(compiler: str) -> Path:
    source = _SOURCE.read_bytes()
    cache = Path(os.environ.get("LIT_EFF_CACHE") or Path.home() / ".cache" / "lit_eff")
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), _cpu().encode()])).hexdigest()[:16]
    target = cache / f"nm_cpu_{key}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as scratch:  # build aside, then rename: ranks may race
        built = Path(scratch) / target.name
        errors = ""
        for flags in (["-O3", "-march=native"], ["-O3"]):
            command = [*shlex.split(compiler), *flags, "-shared", "-fPIC", str(_SOURCE), "-o", str(built)]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode == 0:
                os.replace(built, target)
                return target
            errors = result.stderr.strip()
    raise OSError(f"`{compiler}` failed: {errors[-500:]}")


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("LIT_EFF_NATIVE", "1") == "0":
        return None
    compiler = _compiler()
    try:
        if compiler is None:
            raise OSError("no C compiler found (set CC)")
        library = ctypes.CDLL(str(_build(compiler)))
    except OSError as error:
        warnings.warn(f"lit_eff could not build its CPU N:M mask kernel, so N:M masks are computed with torch "
                      f"ops (slower steps): {error}. Set LIT_EFF_NATIVE=0 to silence this.", stacklevel=3)
        return None
    pointers, sizes = ctypes.c_void_p, ctypes.c_void_p  # arrays, one entry per layer
    library.nm_keep_all.argtypes = [ctypes.c_int64, pointers, sizes, ctypes.c_int32, ctypes.c_int32, pointers,
                                    pointers, sizes]
    library.nm_keep_all.restype = None
    library.add_pruned_all.argtypes = [ctypes.c_int64, pointers, pointers, pointers, sizes, ctypes.c_float]
    library.add_pruned_all.restype = None
    return library


def native_available() -> bool:
    """Whether the kernel is built and on (builds it on first call)."""
    return _library() is not None


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _fits(tensor: torch.Tensor, dtype: torch.dtype, shape: torch.Size) -> bool:
    """A plain contiguous CPU tensor of this dtype and shape."""
    return (type(tensor) in _PLAIN and tensor.dtype is dtype and tensor.is_cpu and tensor.shape == shape
            and tensor.is_contiguous())


def _array(ctype, values: list) -> ctypes.Array:
    return (ctype * len(values))(*values)


def _starts(run: list[tuple[int, int, int]], bases: list[int], unit: int) -> ctypes.Array:
    """The address each piece of ``run`` starts at in its tensor (``bases``: the tensors' addresses,
    ``unit``: bytes per unit of ``start``)."""
    return _array(ctypes.c_void_p, [bases[k] + unit * start for k, start, _ in run])


def _counts(run: list[tuple[int, int, int]]) -> ctypes.Array:
    return _array(ctypes.c_int64, [count for _, _, count in run])


_SHARE = 1 << 18  # entries (1 MiB of float32) a thread gets at least: less costs more to hand out than it saves
_pools: dict[int, ThreadPoolExecutor] = {}  # by process: a pool does not survive a fork


def _shares(sizes: list[int], per_entry: int) -> list[list[tuple[int, int, int]]]:
    """The layers (``sizes`` in units of ``per_entry`` entries) cut into up to ``torch.get_num_threads()``
    runs of about equal size, each a list of ``(layer, start, count)``."""
    total = sum(sizes)
    parts = max(1, min(torch.get_num_threads(), total * per_entry // _SHARE))
    share = -(-total // parts)
    runs: list[list[tuple[int, int, int]]] = [[]]
    room = share
    for layer, size in enumerate(sizes):
        start = 0
        while start < size:
            if room == 0:
                runs.append([])
                room = share
            count = min(size - start, room)
            runs[-1].append((layer, start, count))
            start, room = start + count, room - count
    return runs


def _run(calls: list) -> None:
    """Call each; on threads of a pool when there are several (the C calls release the GIL)."""
    if len(calls) == 1:
        calls[0]()
        return
    pool = _pools.get(os.getpid())
    if pool is None:
        pool = _pools[os.getpid()] = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="lit_eff_kernel")
    list(pool.map(lambda call: call(), calls))


def nm_keep_(weights: Sequence[torch.Tensor], n: int, m: int, masks: Sequence[torch.Tensor],
             kept_minus_one: Sequence[torch.Tensor]) -> list[int | None]:
    """Set each ``masks[i]`` (bool) and ``kept_minus_one[i]`` (0 kept, −1 pruned) to the N:M mask of
    ``weights[i]``; both contiguous, of the weight's shape and agreeing (``kept_minus_one == mask − 1``)
    on entry: only entries whose mask changes are written. Return for each weight how many of its
    entries are NaN or infinite (read in the same pass), or ``None``, having written nothing, where
    the kernel does not serve it (see the module docstring); the caller then uses
    :func:`lit_eff.sparsity.nm_masks`. ``0 < n < m`` is the caller's to check. The work is cut
    into ``torch.get_num_threads()`` equal runs on as many threads (one when it is small).

    >>> w = torch.tensor([[0.1, -3.0, 2.0, 0.5]])
    >>> mask, minus = torch.ones(1, 4, dtype=torch.bool), torch.zeros(1, 4)
    >>> nm_keep_([w], 2, 4, [mask], [minus])  # [None] where no C compiler was found
    [0]
    >>> mask, minus
    (tensor([[False,  True,  True, False]]), tensor([[-1.,  0.,  0., -1.]]))
    """
    library = _library()
    served = [library is not None and w.ndim == 2 and m <= 64 and w.shape[1] % m == 0
              and _fits(w, torch.float32, w.shape) and _fits(e, torch.bool, w.shape)
              and _fits(v, torch.float32, w.shape) for w, e, v in zip(weights, masks, kept_minus_one)]
    todo = [i for i, ok in enumerate(served) if ok]
    out: list[int | None] = [0 if ok else None for ok in served]
    if not todo:
        return out
    w, e, v = ([t[i].data_ptr() for i in todo] for t in (weights, masks, kept_minus_one))
    calls, counts = [], []
    for run in _shares([weights[i].numel() // m for i in todo], m):  # in groups of m
        bad = _array(ctypes.c_int64, [0] * len(run))
        calls.append(functools.partial(library.nm_keep_all, len(run), _starts(run, w, 4 * m), _counts(run), n, m,
                                       _starts(run, e, m), _starts(run, v, 4 * m), bad))
        counts.append((run, bad))
    _run(calls)
    for run, bad in counts:
        for (k, _, _), count in zip(run, bad):
            out[todo[k]] += count
    return out


def add_pruned_(grads: Sequence[torch.Tensor], weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor],
                scale: float) -> list[bool]:
    """``grads[i] += scale · (1 − masks[i]) ⊙ weights[i]`` (the SR-STE term), one pass each reading
    the bool mask, threaded as :func:`nm_keep_`; for each, whether it was served (float32, bool
    mask, contiguous, on CPU, one shape): the others are left unwritten for the caller.

    >>> grad, w = torch.zeros(4), torch.tensor([1.0, 2.0, 3.0, 4.0])
    >>> add_pruned_([grad], [w], [torch.tensor([True, False, True, False])], 0.5), grad  # [False] without a compiler
    ([True], tensor([0., 1., 0., 2.]))
    """
    library = _library()
    served = [library is not None and _fits(g, torch.float32, g.shape) and _fits(w, torch.float32, g.shape)
              and _fits(e, torch.bool, g.shape) for g, w, e in zip(grads, weights, masks)]
    todo = [i for i, ok in enumerate(served) if ok]
    if not todo:
        return served
    g, w, e = ([t[i].data_ptr() for i in todo] for t in (grads, weights, masks))
    _run([functools.partial(library.add_pruned_all, len(run), _starts(run, g, 4), _starts(run, w, 4),
                            _starts(run, e, 1), _counts(run), scale)
          for run in _shares([grads[i].numel() for i in todo], 1)])
    return served
