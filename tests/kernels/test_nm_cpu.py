"""The C kernel for N:M masks on CPU (lit_eff.kernels.nm_cpu), against a re-derivation of the
N:M rule (stable sort of magnitudes per group), and its fallback to torch ops."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_eff.kernels import nm_cpu
from lit_eff.sparsity import MaskGroup, attach_mask, nm_masks


def rederived(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n largest |w| per group of m along the last dimension, ties to the lower index
    (a stable descending sort), NaN below every magnitude."""
    magnitude = weight.abs().reshape(-1, m)
    magnitude = torch.where(magnitude.isnan(), -1.0, magnitude)
    order = magnitude.sort(dim=1, descending=True, stable=True).indices[:, :n]
    return torch.zeros_like(magnitude, dtype=torch.bool).scatter_(1, order, True).reshape(weight.shape)


def awkward(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Random weights, many exact ties (coarse values of both signs), zeros, NaN and infinities."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randint(-3, 4, (rows, cols), generator=gen).float() / 2
    w[::3] = torch.randn(w[::3].shape, generator=gen)
    w[1, :8] = torch.tensor([float("nan"), 1.0, -float("inf"), 0.0, float("nan"), float("nan"), 2.0, -0.0])
    w[2, :8] = torch.tensor([float("inf"), float("inf"), float("inf"), 1.0, -0.0, 0.0, -0.0, 0.0])
    return w


def buffers(shape, seed: int = 1):
    """A mask and its ``mask − 1`` floats that agree (as a Mask keeps them), at random."""
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < 0.5
    return mask, mask.float() - 1


@pytest.fixture(autouse=True)
def fresh_library():
    nm_cpu._library.cache_clear()
    yield
    nm_cpu._library.cache_clear()


@pytest.mark.parametrize("m", [2, 4, 8, 16, 32])
def test_kernel_equals_the_rederived_rule(m):
    assert nm_cpu.native_available()
    # vectors of 16 entries (m <= 16) and, for m <= 8, 8 entries left over for the one-group-at-a-time path
    w = awkward(71, 72 if m <= 8 else 64)
    for n in range(1, m):
        mask, minus = buffers(w.shape)
        assert nm_cpu.nm_keep_([w], n, m, [mask], [minus]) == [int((~w.isfinite()).sum())] == [7]
        expected = rederived(w, n, m)
        assert torch.equal(mask, expected), (n, m)
        assert torch.equal(minus, expected.float() - 1)
        assert (mask.reshape(-1, m).sum(1) == n).all()


@pytest.mark.parametrize("m", [4, 8])
def test_only_changed_entries_are_written_and_every_change_is_caught(m):
    w = torch.randn(9, 72, generator=torch.Generator().manual_seed(3))  # 40 vectors of 16 entries, 8 left over
    mask, minus = buffers(w.shape)
    nm_cpu.nm_keep_([w], 2, m, [mask], [minus])
    before = mask.clone()
    minus[mask] = 7.0  # a mark on kept entries: one the kernel writes loses it
    for row, col in ((3, 20), (8, 68)):  # swap the largest and smallest of a group in a vector, and of a last one
        group = w[row, col // m * m:col // m * m + m]
        largest, smallest = int(group.abs().argmax()), int(group.abs().argmin())
        group[[largest, smallest]] = group[[smallest, largest]].clone()
    expected = rederived(w, 2, m)
    assert nm_cpu.nm_keep_([w], 2, m, [mask], [minus]) == [0]
    assert torch.equal(mask, expected)
    flipped = expected != before
    assert flipped.sum() == 4  # two groups, one entry in and one out each
    assert torch.equal(minus[flipped], expected[flipped].float() - 1)
    rewritten = int((minus[expected] != 7.0).sum())  # kept entries written again
    assert 2 <= rewritten <= 8 + 1  # the changed ones, with the other kept entries of the changed vector


def test_threads_share_the_work_cut_inside_layers(monkeypatch):
    monkeypatch.setattr(nm_cpu, "_SHARE", 100)  # runs of ~100 entries: cuts fall inside layers
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        assert [[(k, c) for k, _, c in run] for run in nm_cpu._shares([50, 20, 5], 4)] == [[(0, 25)], [(0, 25)],
                                                                                           [(1, 20), (2, 5)]]
        weights = [awkward(rows, 64, seed) for seed, rows in enumerate((70, 10, 30))]  # unequal: runs cut inside layers
        buffers_ = [buffers(w.shape) for w in weights]
        bad = nm_cpu.nm_keep_(weights, 2, 4, [b[0] for b in buffers_], [b[1] for b in buffers_])
        assert bad == [int((~w.isfinite()).sum()) for w in weights]
        for w, (mask, minus) in zip(weights, buffers_):
            assert torch.equal(mask, rederived(w, 2, 4)) and torch.equal(minus, mask.float() - 1)
        weights, grads = [torch.randn(w.shape) for w in weights], [torch.randn(w.shape) for w in weights]
        masks = [b[0] for b in buffers_]
        expected = [g + 0.5 * ((1 - e.float()) * w) for g, w, e in zip(grads, weights, masks)]
        assert nm_cpu.add_pruned_(grads, weights, masks, 0.5) == [True] * 3
        assert all(torch.equal(g, e) for g, e in zip(grads, expected))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("case", ["float64", "transposed", "conv", "m does not divide", "float64 buffer"])
def test_kernel_declines_what_it_does_not_serve(case):
    w = torch.randn(8, 16)
    out = buffers(w.shape)
    if case == "float64":
        w = w.double()
    elif case == "transposed":
        w = torch.randn(16, 8).t()
    elif case == "conv":
        w, out = torch.randn(8, 16, 3, 3), buffers((8, 16, 3, 3))
    elif case == "m does not divide":
        w, out = torch.randn(8, 18), buffers((8, 18))
    else:
        out = (out[0], out[1].double())
    before = [t.clone() for t in out]
    assert nm_cpu.nm_keep_([w], 2, 4, [out[0]], [out[1]]) == [None]
    assert all(torch.equal(a, b) for a, b in zip(before, out))  # nothing written


def test_the_srste_term_equals_its_formula():
    gen = torch.Generator().manual_seed(0)
    w, grad = torch.randn(7, 40, generator=gen), torch.randn(7, 40, generator=gen)
    mask = torch.rand(7, 40, generator=gen) < 0.5
    expected = grad + 2e-4 * ((1 - mask.float()) * w)  # g + λ (1 − E) ⊙ W
    assert nm_cpu.add_pruned_([grad], [w], [mask], 2e-4) == [True]
    assert torch.equal(grad, expected)


@pytest.mark.parametrize("case", ["float64", "transposed", "float mask", "other shape"])
def test_the_srste_term_declines_what_it_does_not_serve(case):
    w, grad, mask = torch.randn(8, 16), torch.randn(8, 16), torch.rand(8, 16) < 0.5
    if case == "float64":
        w, grad = w.double(), grad.double()
    elif case == "transposed":
        grad = torch.randn(16, 8).t()
    elif case == "float mask":
        mask = mask.float()
    else:
        mask = mask.reshape(16, 8)
    before = grad.clone()
    assert nm_cpu.add_pruned_([grad], [w], [mask], 0.5) == [False]
    assert torch.equal(grad, before)


def test_group_srste_term_is_the_same_on_both_paths(monkeypatch):
    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 8).double(), nn.Linear(8, 8))
    layers = {name: module for name, module in model.named_children()}
    for module in layers.values():
        attach_mask(module)
    group = MaskGroup(layers)
    group.set_nm_masks(2, 4)
    for w in group.weights:
        w.grad = torch.randn_like(w)
    before = [w.grad.clone() for w in group.weights]
    group.add_pruned_weights_to_grad(0.5)  # the float32 layers through the kernel, the float64 one through torch
    kernel = [w.grad for w in group.weights]
    for w, grad in zip(group.weights, before):
        w.grad = grad.clone()
    monkeypatch.setenv("LIT_EFF_NATIVE", "0")
    nm_cpu._library.cache_clear()
    group.add_pruned_weights_to_grad(0.5)
    for w, got, grad in zip(group.weights, kernel, before):
        assert torch.equal(got, w.grad) and not torch.equal(got, grad)


def test_group_masks_match_nm_masks_on_both_paths():
    model = nn.Sequential(nn.Linear(16, 8), nn.Conv2d(8, 8, 3), nn.Linear(8, 8).double(), nn.Linear(8, 8))
    layers = {name: module for name, module in model.named_children()}
    for module in layers.values():
        attach_mask(module)
        with torch.no_grad():
            module.parametrizations.weight.original.copy_(torch.randn(module.weight.shape).round(decimals=1))  # ties
    group = MaskGroup(layers)
    version = group.version
    group.set_nm_masks(2, 4)  # the Linears through the kernel, the conv and the float64 layer through torch ops
    expected = nm_masks([module.parametrizations.weight.original for module in layers.values()], 2, 4)
    for p, e in zip(group.params, expected):
        assert torch.equal(p.mask, e)
        assert torch.equal(p.kept_minus_one, e.to(p.kept_minus_one.dtype) - 1)
        assert p._density == 0.5 and p.mode == "binary"
    assert group.version == version + 1
    x = torch.randn(1, 16)
    assert torch.equal(layers["0"](x), x @ (layers["0"].parametrizations.weight.original * expected[0]).t()
                       + layers["0"].bias)


def test_finite_flags_come_from_the_kernel_while_the_weights_are_unchanged(monkeypatch):
    layers = {"a": nn.Linear(8, 4), "b": nn.Linear(8, 4)}
    for layer in layers.values():
        attach_mask(layer)
    group = MaskGroup(layers)
    with torch.no_grad():
        group.weights[1][0, 0] = float("nan")
    group.set_nm_masks(2, 4)
    norms = []
    monkeypatch.setattr(torch, "_foreach_norm", lambda tensors, *a, **k: norms.append(len(tensors)) or
                        [t.norm() for t in tensors])
    assert group.finite().tolist() == [True, False] and norms == []  # read by the kernel: no pass of its own
    with torch.no_grad():
        group.weights[0][0, 0] = float("inf")  # a change after the masks: measured again
    assert group.finite().tolist() == [False, False] and norms == [2]


def test_without_a_compiler_it_warns_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("LIT_EFF_CACHE", str(tmp_path / "cache"))
    with pytest.warns(UserWarning, match="could not build its CPU N:M mask kernel.*LIT_EFF_NATIVE=0"):
        assert not nm_cpu.native_available()
    w = torch.randn(4, 8)
    mask, minus = buffers(w.shape)
    assert nm_cpu.nm_keep_([w], 2, 4, [mask], [minus]) == [None]
    layer = nn.Linear(8, 4)
    attach_mask(layer)
    group = MaskGroup({"fc": layer})
    group.set_nm_masks(2, 4)
    assert torch.equal(group.params[0].mask, rederived(layer.parametrizations.weight.original.detach(), 2, 4))


def test_a_compiler_command_with_a_wrapper(monkeypatch, tmp_path):
    import shutil

    monkeypatch.setenv("CC", f"env {shutil.which('cc') or shutil.which('gcc')}")  # like CC="ccache gcc"
    monkeypatch.setenv("LIT_EFF_CACHE", str(tmp_path))
    assert nm_cpu.native_available()


def test_switched_off_quietly(monkeypatch, recwarn):
    monkeypatch.setenv("LIT_EFF_NATIVE", "0")
    assert not nm_cpu.native_available()
    assert not [w for w in recwarn if "kernel" in str(w.message)]


def test_builds_into_the_cache_once(monkeypatch, tmp_path):
    monkeypatch.setenv("LIT_EFF_CACHE", str(tmp_path))
    assert nm_cpu.native_available()
    built = list(tmp_path.glob("nm_cpu_*.so"))
    assert len(built) == 1 and not [p for p in tmp_path.iterdir() if p.is_dir()]  # the scratch folder is gone
    stamp = built[0].stat().st_mtime_ns
    nm_cpu._library.cache_clear()
    assert nm_cpu.native_available() and built[0].stat().st_mtime_ns == stamp  # reused, not rebuilt
