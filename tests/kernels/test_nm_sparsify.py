"""lit_eff.kernels.nm_sparsify: the Triton kernels against the torch reference (under
TRITON_INTERPRET=1, in a fresh process), the reference against its definition, the dispatcher
and argument errors."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

from lit_eff import sparsity
from lit_eff.kernels import nm_sparsify, nm_sparsify_reference, triton_available

module = importlib.import_module("lit_eff.kernels.nm_sparsify")  # the package exports the function
HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))


@pytest.mark.skipif(not triton_available(), reason="triton is installed on Linux x86_64 only")
def test_triton_kernels_match_the_reference_in_the_interpreter():
    """Masks and effective weights bit-identical, gradients identical, on m in {4, 8, 16, 32}, n in
    {1, m/2, m-1}, beta in {0, 0.3, 1}, group counts that leave a partial block, m = 6, a conv weight, fp16."""
    # PYTHONPATH: the script's own folder comes first on sys.path, so without it an installed lit_eff
    # (another checkout) would be tested instead of this one
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    result = subprocess.run([sys.executable, os.path.join(HERE, "interpret_nm_sparsify.py")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "cases passed" in result.stdout


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 8), (3, 16)])
def test_reference_is_the_definition(n, m, beta):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 2 * m, generator=gen, requires_grad=True)
    out, mask = nm_sparsify_reference(w, n, m, beta=beta, srste_lambda=0.1)
    expected_mask = sparsity.nm_mask(w, n, m)
    assert torch.equal(mask, expected_mask) and not mask.requires_grad
    assert torch.equal(out, w.detach() * (expected_mask + beta * ~expected_mask))
    grad = torch.randn(w.shape, generator=gen)
    out.backward(grad)
    assert torch.allclose(w.grad, grad + 0.1 * (~expected_mask) * w.detach())  # STE (no beta) + SR-STE


def test_dispatcher_uses_the_reference_off_cuda(monkeypatch):
    def no_triton():
        raise AssertionError("the Triton kernels must not be built for a CPU tensor")

    monkeypatch.setattr(module, "_kernels", no_triton)
    w = torch.randn(4, 8)
    out, mask = nm_sparsify(w, 2, 4)
    assert torch.equal(mask, sparsity.nm_mask(w, 2, 4)) and torch.equal(out, w * mask)


@pytest.mark.parametrize(("args", "kwargs", "match"), [
    ((torch.zeros(4, 8), 4, 4), {}, r"Expected `n` < `m`, got n=4, m=4"),
    ((torch.zeros(4, 8), 0, 4), {}, r"Expected `n` > 0, got n=0"),
    ((torch.zeros(4, 6), 2, 4), {}, r"Expected `m` to divide the input size of a weight with shape \(4, 6\), got m=4"),
    ((torch.zeros(8), 2, 4), {}, r"at least 2 dimensions"),
    ((torch.zeros(4, 8), 2, 4), {"beta": 1.5}, r"Expected `beta` in \[0, 1\], got beta=1.5"),
    ((torch.zeros(4, 8), 2, 4), {"srste_lambda": -1.0}, r"Expected `srste_lambda` >= 0, got srste_lambda=-1.0"),
])
def test_bad_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        nm_sparsify(*args, **kwargs)
