"""Mid-epoch resume is exact also when `max_epochs` is set: then `configure_optimizers` reads
`trainer.estimated_stepping_batches`, which makes Lightning create the training loader before it
restores the loops, and Lightning's own restore of the loader's position never happens."""

import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.helpers import digits, flat_state, max_abs_diff, seeded, tiny_vit


def fit(ckpt_dir, ckpt_path=None, **kwargs):
    seeded(0)
    model = tiny_vit()
    trainer = Trainer(accelerator="cpu", max_steps=14, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=1, num_sanity_val_steps=0,
                      callbacks=[ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=6, save_top_k=-1,
                                                 filename="{step}")], **kwargs)
    trainer.fit(model, datamodule=digits(batch_size=128), ckpt_path=ckpt_path)  # 9 steps per epoch
    return flat_state(model)


@pytest.mark.parametrize("max_epochs", [None, 200])
def test_resume_mid_epoch_equals_uninterrupted(max_epochs, tmp_path):
    reference = fit(tmp_path / "a", max_epochs=max_epochs)
    resumed = fit(tmp_path / "b", ckpt_path=str(tmp_path / "a" / "step=6.ckpt"), max_epochs=max_epochs)
    assert max_abs_diff(resumed, reference) <= 1e-6
