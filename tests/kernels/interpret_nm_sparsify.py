"""Triton kernel vs torch reference for lit_eff.kernels.nm_sparsify, under TRITON_INTERPRET=1 on CPU.

Run by tests/kernels/test_nm_sparsify.py in a fresh process (triton reads TRITON_INTERPRET when a
kernel is built, so the variable must be set before anything in the process builds one); also
runnable by hand: ``python tests/kernels/interpret_nm_sparsify.py``. Exits non-zero on the first
mismatch, naming the case.
"""

from __future__ import annotations

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from lit_eff.kernels.nm_sparsify import _apply, _block_g  # noqa: E402


def awkward(shape, m, dtype=torch.float32, seed=0):
    """Random weights plus rows of ties: all equal, all zero, equal magnitudes of both signs."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen)
    flat = w.reshape(-1, shape[-1]) if w.ndim == 2 else w.view(w.shape[0], -1)
    flat[0, :m] = 0.5
    if flat.shape[0] > 2:
        flat[1] = 0.0
        flat[2, :m] = torch.tensor([(-1) ** i * (i % 3) for i in range(m)], dtype=w.dtype)
    return w.to(dtype)


def case(shape, n, m, beta, lam, dtype=torch.float32):
    w = awkward(shape, m, dtype)
    ref = w.clone().requires_grad_()
    ker = w.clone().requires_grad_()
    out_ref, mask_ref = _apply(ref, n, m, beta, lam, "torch")
    out_ker, mask_ker = _apply(ker, n, m, beta, lam, "triton")
    where = f"shape={tuple(shape)} n={n} m={m} beta={beta} lambda={lam} dtype={dtype}"
    assert mask_ker.dtype == torch.bool and torch.equal(mask_ker, mask_ref), f"mask differs: {where}"
    groups = mask_ker.movedim(1, -1) if mask_ker.ndim > 2 else mask_ker
    assert (groups.reshape(-1, m).sum(1) == n).all(), f"not exactly {n}:{m}: {where}"
    assert out_ker.dtype == w.dtype and torch.equal(out_ker, out_ref), f"effective weight differs: {where}"
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    out_ref.backward(grad)
    out_ker.backward(grad)
    # fp32: identical; fp16: the kernel adds in fp32 and rounds once, torch rounds twice (1 ulp apart)
    exact = {"rtol": 0, "atol": 0} if dtype == torch.float32 else {}
    torch.testing.assert_close(ker.grad, ref.grad, **exact, msg=lambda s: f"grad differs: {where}: {s}")
    expected = (grad.float() + lam * (~mask_ref) * w.float()).to(dtype)  # the formula, for the reference too
    torch.testing.assert_close(ref.grad, expected, msg=lambda s: f"reference grad wrong: {where}: {s}")
    return where


def nan_case(n, m):
    """NaN weights rank below every |w| in the kernel as in the reference: still exactly n per group."""
    w = awkward((6, 4 * m), m)
    w[3, 1] = w[4, :m] = float("nan")  # one NaN in a group, and a group of NaNs
    w[5, 0] = float("inf")
    out_ref, mask_ref = _apply(w, n, m, 0.0, 0.0, "torch")
    out_ker, mask_ker = _apply(w, n, m, 0.0, 0.0, "triton")
    where = f"NaN weights n={n} m={m}"
    assert torch.equal(mask_ker, mask_ref), f"mask differs: {where}"
    assert (mask_ker.reshape(-1, m).sum(1) == n).all(), f"not exactly {n}:{m}: {where}"
    torch.testing.assert_close(out_ker, out_ref, rtol=0, atol=0, equal_nan=True)
    return where


def main() -> int:
    cases = []
    for m in (4, 8, 16, 32):
        rows = 2 * _block_g(m) // 2 + 3  # not a multiple of the groups a program takes
        for n in sorted({1, m // 2, m - 1}):
            for beta in (0.0, 0.3, 1.0):
                cases.append(((rows, 2 * m), n, m, beta, 2e-4 if beta != 1.0 else 0.0))
    cases += [
        ((1100, 8), 2, 4, 0.0, 0.01),   # 2200 groups: 5 programs of 512, the last partial
        ((7, 12), 2, 6, 0.3, 0.01),     # m not a power of 2 (columns padded to 8)
        ((6, 8, 3, 3), 2, 4, 0.0, 0.01),  # a convolution: groups along input channels
        ((5, 16), 2, 8, 0.3, 0.01, torch.float16),
    ]
    for args in cases:
        print("ok", case(*args), flush=True)
    for n, m in ((2, 4), (1, 8), (5, 16)):
        print("ok", nan_case(n, m), flush=True)
        cases.append((n, m))
    print(f"{len(cases)} cases passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
