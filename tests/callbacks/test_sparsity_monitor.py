import glob

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_eff import sparsity
from lit_eff.callbacks import NMSparsity, SparsityMonitor
from lit_eff.models import GPT
from tests.helpers import digits, make_trainer, seeded, tiny_vit


def test_measure_counts_zeros_masks_and_flips():
    model = GPT(vocab_size=16, block_size=8, n_layer=1, n_head=1, n_embd=8)
    layer = model.blocks[0].mlp.fc1
    sparsity.attach_mask(layer, mask=sparsity.nm_mask(layer.weight, 2, 4))
    monitor = SparsityMonitor(per_layer=True)
    first = monitor.measure(model)
    assert first["sparsity/global"] == first["sparsity/mask_global"] == 0.5
    assert first["sparsity/flip_rate"] == 0.0  # nothing to compare with yet
    assert first["sparsity/layers/blocks.0.mlp.fc1"] == 0.5
    assert monitor.measure(model)["sparsity/flip_rate"] == 0.0  # same mask: no flips
    new_mask = sparsity.get_mask(layer).clone()
    new_mask[0] = ~new_mask[0]  # the 8 positions of one row flip
    sparsity.set_mask(layer, new_mask)
    assert monitor.measure(model)["sparsity/flip_rate"] == pytest.approx(8 / layer.weight.numel())
    sparsity.set_beta(layer, 0.5)  # mask decay: pruned weights scaled, not zero
    scaled = monitor.measure(model)
    assert scaled["sparsity/global"] == 0.0 and scaled["sparsity/mask_global"] == 0.5


def test_logs_scalars_a_density_chart_and_an_nm_pattern_to_tensorboard(tmp_path):
    seeded()
    monitor = SparsityMonitor(log_every_n_steps=2, image_every_n_steps=4)
    trainer = make_trainer(max_steps=4, logger=TensorBoardLogger(str(tmp_path)), log_every_n_steps=1,
                           callbacks=[NMSparsity(n=2, m=4, method="ste"), monitor])
    trainer.fit(tiny_vit(), datamodule=digits())
    events = EventAccumulator(glob.glob(str(tmp_path / "**" / "events.*"), recursive=True)[0])
    events.Reload()
    logged = events.Scalars("sparsity/mask_global")
    assert len(logged) >= 2 and all(e.value == 0.5 for e in logged)
    assert set(events.Tags()["images"]) == {"sparsity/density_by_layer", "sparsity/pattern/model.blocks.0.attn.qkv"}
    # the chart's numbers: each layer's nonzero fraction of the weight forward uses
    for name, module in sparsity.masked_modules(trainer.lightning_module).items():
        assert monitor.densities[name] == float((module.weight != 0).float().mean()) == 0.5, name


def test_density_chart_has_one_bar_per_layer_at_its_density():
    densities = {"blocks.0.attn.qkv": 0.5, "blocks.0.mlp.fc1": 0.125, "head": 1.0}
    figure = sparsity.density_chart(densities)
    axes = figure.axes[0]
    assert [round(bar.get_width(), 6) for bar in axes.patches] == [0.5, 0.125, 1.0]
    assert [label.get_text() for label in axes.get_yticklabels()] == list(densities)
    assert {text.get_text() for text in axes.texts} == {"50%", "12%", "100%"}


def test_pattern_crop_shows_the_corner_of_the_mask_and_the_count_kept_per_group():
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    mask = sparsity.nm_mask(weight, 1, 8)
    figure = sparsity.pattern_crop(mask, "fc1", m=8, rows=4, columns=32)
    axes = figure.axes[0]
    shown = torch.as_tensor(axes.images[0].get_array())
    assert torch.equal(shown.bool(), mask[:4, :32])
    counts = [text.get_text() for text in axes.texts]
    assert counts == ["1"] * (4 * 4)  # 4 rows x 4 groups of 8, one kept in each
    assert "groups of 8" in axes.get_title()
    conv = sparsity.nm_mask(torch.randn(8, 16, 3, 3), 2, 4)  # a conv: inputs at the first kernel position
    shown = torch.as_tensor(sparsity.pattern_crop(conv, "conv", m=4).axes[0].images[0].get_array())
    assert torch.equal(shown.bool(), conv[:8, :16, 0, 0])


@pytest.mark.parametrize("kwargs, message", [
    (dict(log_every_n_steps=0), r"Expected `log_every_n_steps` to be an integer >= 1, got log_every_n_steps=0"),
    (dict(image_every_n_steps=-2), r"Expected `image_every_n_steps` to be an integer >= 1"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SparsityMonitor(**kwargs)
