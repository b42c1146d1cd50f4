import glob

import pytest
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


def test_logs_scalars_and_a_mask_image_to_tensorboard(tmp_path):
    seeded()
    trainer = make_trainer(max_steps=4, logger=TensorBoardLogger(str(tmp_path)), log_every_n_steps=1,
                           callbacks=[NMSparsity(n=2, m=4, method="ste"),
                                      SparsityMonitor(log_every_n_steps=2, image_every_n_steps=4)])
    trainer.fit(tiny_vit(), datamodule=digits())
    events = EventAccumulator(glob.glob(str(tmp_path / "**" / "events.*"), recursive=True)[0])
    events.Reload()
    logged = events.Scalars("sparsity/mask_global")
    assert len(logged) >= 2 and all(e.value == 0.5 for e in logged)
    assert any(tag.startswith("sparsity/mask/") for tag in events.Tags()["images"])


@pytest.mark.parametrize("kwargs, message", [
    (dict(log_every_n_steps=0), r"Expected `log_every_n_steps` to be an integer >= 1, got log_every_n_steps=0"),
    (dict(image_every_n_steps=-2), r"Expected `image_every_n_steps` to be an integer >= 1"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SparsityMonitor(**kwargs)
