"""2:4 inference path: which layers have the pattern, and why a conversion is refused here (CPU),
one message listing every reason; the conversion itself where a GPU >= sm80 is present."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_eff import sparsity
from lit_eff.models import GPT


def sparse_gpt(dtype=torch.float32) -> GPT:
    """A 1-layer GPT whose block Linears were trained 2:4 (masks attached, then exported)."""
    torch.manual_seed(0)
    model = GPT(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32)
    for layer in sparsity.find_targets(model).values():
        sparsity.attach_mask(layer, mask=sparsity.nm_mask(layer.weight, 2, 4))
    return sparsity.export(model).to(dtype)


BLOCK = ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]


def test_is_2to4():
    w = torch.tensor([[1.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0]])
    assert sparsity.is_2to4(w)
    assert not sparsity.is_2to4(torch.tensor([[1.0, 1.0, 0.0, 2.0]]))
    assert not sparsity.is_2to4(torch.zeros(2, 6))  # no groups of 4
    assert not sparsity.is_2to4(torch.zeros(4))


def test_layers_2to4_finds_exactly_the_exported_2to4_layers():
    model = sparse_gpt()
    assert sparsity.layers_2to4(model) == BLOCK  # the LM head (tied, dense) is not
    assert sparsity.layers_2to4(model, include=["*mlp*"], exclude=["*fc2"]) == ["blocks.0.mlp.fc1"]
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight[3, 4:8] = 1.0  # 4 nonzeros in one group
    assert sparsity.layers_2to4(model) == [name for name in BLOCK if name != "blocks.0.mlp.fc1"]


def test_cpu_fp32_refused_with_every_reason_and_nothing_converted():
    model = sparse_gpt()
    with pytest.raises(ValueError, match="Cannot convert to 2:4 semi-structured") as error:
        sparsity.to_semi_structured(model)
    message = str(error.value)
    for name in BLOCK:
        assert f"`{name}.weight` is on cpu; 2:4 semi-structured sparse tensors need a CUDA GPU with compute " \
               "capability >= 8.0" in message
        assert f"`{name}.weight` is float32; 2:4 sparse matmuls here take float16 or bfloat16" in message
    assert "lm_head" not in message and "not 2:4" not in message
    assert all(type(p) is nn.Parameter and p.layout == torch.strided for p in model.parameters())


def test_half_precision_leaves_only_the_device_reason():
    problems = sparsity.semi_structured_problems(sparse_gpt(torch.float16))
    assert list(problems) == BLOCK
    assert all(len(reasons) == 1 and "is on cpu" in reasons[0] for reasons in problems.values())


def test_shape_pattern_masks_and_empty_selection():
    layer = nn.Linear(8, 20, dtype=torch.bfloat16)  # 20 x 8: below every backend's minimum
    with torch.no_grad():
        layer.weight.mul_(sparsity.nm_mask(layer.weight, 2, 4))
    problems = sparsity.semi_structured_problems(nn.Sequential(layer))["0"]
    assert any(r.startswith("`0.weight` has shape (20, 8); the") and "backend needs both dimensions multiples of"
               in r for r in problems), problems

    model = sparse_gpt(torch.float16)
    with torch.no_grad():
        model.blocks[0].mlp.fc2.weight[5, 8:12] = 1.0
    with pytest.raises(ValueError, match=r"`blocks.0.mlp.fc2.weight` is not 2:4: 1 group of 4 has more than 2 "
                                         r"nonzeros \(first: row 5, columns 8-11\)"):
        sparsity.to_semi_structured(model, include=["*mlp*"])

    masked = GPT(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32)
    sparsity.attach_mask(masked.blocks[0].mlp.fc1, mask=sparsity.nm_mask(masked.blocks[0].mlp.fc1.weight, 2, 4))
    with pytest.raises(ValueError, match=r"still carries lit_eff masks; call lit_eff.sparsity.export\(model\) first"):
        sparsity.to_semi_structured(masked)
    with pytest.raises(ValueError, match=r"no Linear layer has the 2:4 pattern"):
        sparsity.to_semi_structured(GPT(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32))
    with pytest.raises(ValueError, match=r"no Linear layer matched include=\['\*nothing\*'\]"):
        sparsity.to_semi_structured(sparse_gpt(), include=["*nothing*"])


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="needs a CUDA GPU with compute capability >= 8.0")
def test_conversion_on_gpu_matches_dense():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 64))
    for layer in (model[0], model[2]):
        sparsity.attach_mask(layer, mask=sparsity.nm_mask(layer.weight, 2, 4))
    model = sparsity.export(model).half().cuda().eval()
    x = torch.randn(32, 128, device="cuda", dtype=torch.half)
    with torch.no_grad():
        dense = model(x)
        assert sparsity.to_semi_structured(model) == ["0", "2"]
        sparse = model(x)
    assert isinstance(model[0].weight.data, torch.sparse.SparseSemiStructuredTensor)
    torch.testing.assert_close(sparse, dense, rtol=1e-2, atol=1e-2)
