import pytest

from lit_eff.gradients import find_units, frozen_count, stem_parameters
from tests.helpers import tiny_cnn, tiny_gpt, tiny_vit


def test_schedule_freezes_units_one_by_one_between_start_and_end():
    counts = [frozen_count(s, 100, 8, 0.5, 0.2, 0.8) for s in range(100)]
    assert counts[:20] == [0] * 20 and counts[20] == 1  # the first unit at freeze_start
    assert counts[80:] == [4] * 20 and counts[79] == 3  # the 4th (k = 0.5 * 8) at freeze_end
    assert all(b - a in (0, 1) for a, b in zip(counts, counts[1:]))  # monotone, one at a time
    assert [frozen_count(s, 10, 4, 0.75, 0.5, 0.5) for s in (4, 5)] == [0, 3]  # all at once
    assert frozen_count(99, 100, 3, 0.3, 0.0, 1.0) == 0  # floor(0.9) units: none


def test_units_and_stems_of_the_kit_models():
    vit, gpt, cnn = tiny_vit(), tiny_gpt(), tiny_cnn()
    units = find_units(vit)
    assert units.names == ["model.blocks.0", "model.blocks.1"]
    assert set(stem_parameters(vit, units)) == {"model.cls_token", "model.pos_embed", "model.patch_embed.proj.weight",
                                               "model.patch_embed.proj.bias"}
    units = find_units(gpt)
    assert units.names == ["model.blocks.0", "model.blocks.1"]
    assert list(stem_parameters(gpt, units)) == ["model.wpe.weight"]  # wte is tied to the LM head
    units = find_units(cnn)
    assert units.names == ["model.layer1", "model.layer2", "model.layer3", "model.layer4"]
    assert {n.split(".")[1] for n in stem_parameters(cnn, units)} == {"conv1", "bn1"}
    assert find_units(vit, "model.blocks").names == units_names(2)


def units_names(n):
    return [f"model.blocks.{i}" for i in range(n)]


def test_unknown_containers_are_refused_with_what_exists():
    import torch

    with pytest.raises(ValueError, match=r"Found no blocks to freeze in Linear.*blocks='model.blocks'"):
        find_units(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"Expected `blocks` to name a submodule of ImageClassifier, got blocks='model.nope'"):
        find_units(tiny_vit(), "model.nope")
    with pytest.raises(ValueError, match=r"Expected `blocks` to name an nn.ModuleList or nn.Sequential"):
        find_units(tiny_vit(), "model.head")
