"""Feature layer pairing by name patterns, and output widths read from the structure."""

from __future__ import annotations

import pytest

from lit_eff.distill import match_layers, output_width, pair_layers
from tests.distill.common import gpt
from tests.helpers import tiny_cnn, tiny_gpt, tiny_vit


def test_patterns_pair_in_order_and_count_must_match():
    student, teacher = tiny_gpt().model, gpt(n_layer=3).model
    pairs = pair_layers(student, teacher, {"blocks.?": "blocks.[12]"})
    assert [(s, t) for s, t, _, _ in pairs] == [("blocks.0", "blocks.1"), ("blocks.1", "blocks.2")]
    assert pairs[1][2] is student.blocks[1] and pairs[1][3] is teacher.blocks[2]
    with pytest.raises(ValueError, match=r"`features` 'blocks.\?': 'blocks.\?' must match as many teacher layers"):
        pair_layers(student, teacher, {"blocks.?": "blocks.?"})


def test_a_pattern_that_matches_nothing_lists_the_layers():
    student, teacher = tiny_vit().model, tiny_vit().model
    with pytest.raises(ValueError, match=r"`features` 'layer3': 'layer3' matches no student layer of "
                                         r"VisionTransformer; its layers: patch_embed, patch_embed.proj"):
        pair_layers(student, teacher, {"layer3": "blocks.1"})
    with pytest.raises(ValueError, match=r"'block.1' matches no teacher layer"):
        pair_layers(student, teacher, {"blocks.1": "block.1"})


def test_output_widths():
    vit, gpt, cnn = tiny_vit().model, tiny_gpt().model, tiny_cnn().model
    assert output_width(vit.blocks[1]) == (32, -1)
    assert output_width(vit) == (10, -1)  # the head
    assert output_width(gpt.blocks[0]) == (32, -1)
    assert output_width(gpt) == (256, -1)
    assert output_width(cnn.layer3) == (256, 1)
    assert output_width(match_layers(cnn, "act1")["act1"]) is None
