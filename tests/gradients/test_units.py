import pytest
import torch

from lit_eff.gradients import find_units, stem_parameters
from tests.helpers import tiny_cnn, tiny_gpt, tiny_vit


def test_units_and_stems_of_the_kit_models():
    vit, gpt, cnn = tiny_vit(), tiny_gpt(), tiny_cnn()
    units = find_units(vit)
    assert units.names == ["model.blocks.0", "model.blocks.1"]
    assert set(stem_parameters(vit, units)) == {"model.cls_token", "model.pos_embed", "model.patch_embed.proj.weight",
                                               "model.patch_embed.proj.bias"}
    assert find_units(vit, "model.blocks").names == units.names
    units = find_units(gpt)
    assert units.names == ["model.blocks.0", "model.blocks.1"]
    assert list(stem_parameters(gpt, units)) == ["model.wpe.weight"]  # wte is tied to the LM head
    units = find_units(cnn)
    assert units.names == ["model.layer1", "model.layer2", "model.layer3", "model.layer4"]
    assert {n.split(".")[1] for n in stem_parameters(cnn, units)} == {"conv1", "bn1"}


def test_unknown_containers_are_refused_with_what_exists():
    with pytest.raises(ValueError, match=r"Found no blocks to freeze in Linear.*blocks='model.blocks'"):
        find_units(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"Expected `blocks` to name a submodule of ImageClassifier, got blocks='model.nope'"):
        find_units(tiny_vit(), "model.nope")
    with pytest.raises(ValueError, match=r"Expected `blocks` to name an nn.ModuleList or nn.Sequential"):
        find_units(tiny_vit(), "model.head")
