"""Target selection: default transformer-block Linears, globs, and clear errors."""

import pytest
from torch import nn

from lit_eff.models import GPT
from lit_eff.sparsity import attach_mask, find_targets
from tests.helpers import tiny_cnn, tiny_gpt, tiny_vit

BLOCK_LINEARS = [f"blocks.{i}.{layer}" for i in range(2) for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]


def test_default_targets_on_the_tiny_vit():
    model = tiny_vit().model
    targets = find_targets(model)
    assert list(targets) == BLOCK_LINEARS  # patch_embed.proj (Conv2d) and head stay dense
    assert all(isinstance(m, nn.Linear) for m in targets.values())
    assert targets["blocks.0.mlp.fc1"] is model.blocks[0].mlp.fc1


def test_default_targets_on_the_gpt_skip_embeddings_and_tied_head():
    model = tiny_gpt().model
    assert list(find_targets(model)) == BLOCK_LINEARS  # wte, wpe, head excluded
    # through the LightningModule the names carry its prefix and still match
    assert list(find_targets(tiny_gpt())) == [f"model.{name}" for name in BLOCK_LINEARS]


def test_include_exclude_and_kinds():
    model = tiny_vit().model
    assert list(find_targets(model, include="*mlp.*", exclude=["blocks.1.*", "*fc2"])) == ["blocks.0.mlp.fc1"]
    assert list(find_targets(model, include=["patch_embed*"], kinds=["conv"])) == ["patch_embed.proj"]
    assert list(find_targets(model, include=["*"], kinds=("linear", "conv")))[::9] == ["patch_embed.proj", "head"]
    assert "conv1.0" in find_targets(tiny_cnn().model, include=["conv1*"], kinds="conv")


def test_masked_layers_are_still_found():
    model = tiny_gpt().model
    attach_mask(model.blocks[0].mlp.fc1)
    assert list(find_targets(model)) == BLOCK_LINEARS


def test_no_match_lists_existing_layers():
    with pytest.raises(ValueError, match=r"No linear layer matched include=\['\*fc3'\] exclude=\[\]; "
                                         r"Linear/Conv layers in the model: patch_embed.proj, blocks.0.attn.qkv, "):
        find_targets(tiny_vit().model, include=["*fc3"])
    with pytest.raises(ValueError, match=r"exclude=\['\*'\]; .*blocks.2.mlp.fc2, \.\.\. \(17 in all\)$"):
        find_targets(GPT(n_layer=4, n_embd=8, n_head=2, block_size=8), exclude=["*"])  # 16 block Linears + head
    with pytest.raises(ValueError, match=r"Sequential has no Linear or Conv layers to make sparse"):
        find_targets(nn.Sequential(nn.LayerNorm(4), nn.ReLU()))


def test_tied_weight_is_refused():
    with pytest.raises(ValueError, match=r"`head.weight` is tied to wte.weight; a mask on a tied weight .* "
                                         r"Exclude `head` \(exclude=\['head'\]\)"):
        find_targets(tiny_gpt().model, include=["head"])


@pytest.mark.parametrize("kwargs,match", [
    (dict(kinds=["lin"]), r"Expected `kinds` from \['conv', 'linear'\], got kinds=\['lin'\]"),
    (dict(kinds=[]), r"Expected `kinds` from \['conv', 'linear'\], got kinds=\[\]"),
    (dict(include=[3]), r"Expected `include` to be a list of name patterns \(strings\), got include=\[3\]"),
    (dict(exclude=[None]), r"Expected `exclude` to be a list of name patterns \(strings\), got exclude=\[None\]"),
])
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        find_targets(tiny_vit().model, **kwargs)


def test_a_pattern_matching_only_other_layer_kinds_says_so():
    with pytest.raises(ValueError, match=r"include=\['\*conv\*'\] exclude=\[\] matched only conv layers \(conv1.0, "
                                         r".*\), and only linear layers are masked: add \['conv'\] to the layer kinds"):
        find_targets(tiny_cnn().model, include=["*conv*"])
    assert "layer1.0.conv1" in find_targets(tiny_cnn().model, include=["*conv*"], kinds=["conv"])


def test_names_do_not_depend_on_a_compiled_submodule():
    import torch

    model = tiny_gpt()
    plain = list(find_targets(model))
    model.model.blocks[0] = torch.compile(model.model.blocks[0], backend="eager")
    assert list(find_targets(model)) == plain  # no `_orig_mod.` in the names
