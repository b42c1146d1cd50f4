"""The data must fit the model, checked before the model summary; a valid pairing is not refused."""

import logging

import numpy as np
import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image

from lit_eff.datamodules import ImageFolderDataModule, TextDataModule
from lit_eff.models import CausalLM, ImageClassifier
from tests.helpers import digits, make_trainer, tiny_gpt, tiny_vit


def write_images(root, classes, per_class=4, size=8):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_more_classes_than_the_head_is_refused_before_the_summary(tmp_path, caplog):
    write_images(tmp_path / "imgs", ["a", "b", "c"])
    data = ImageFolderDataModule(str(tmp_path / "imgs"), image_size=8, batch_size=2, num_workers=0)
    model = ImageClassifier("resnet10t", num_classes=2, in_chans=3)
    with caplog.at_level(logging.INFO), pytest.raises(
            ValueError, match=r"ImageFolderDataModule has 3 classes, more than the model's `num_classes`=2; "
                              r"set --model.init_args.num_classes 3"):
        make_trainer(max_steps=1, enable_model_summary=True).fit(model, datamodule=data)
    assert "Total params" not in caplog.text


def test_channels_must_match():
    with pytest.raises(ValueError, match=r"DigitsDataModule has 1 image channels, but the model's `in_chans`=3"):
        make_trainer(max_steps=1).fit(ImageClassifier("resnet10t", in_chans=3), datamodule=digits())


def test_an_unreadable_image_is_named(tmp_path):
    write_images(tmp_path / "imgs", ["a", "b"], per_class=3)
    (tmp_path / "imgs" / "b" / "broken.png").write_bytes(b"not an image")
    data = ImageFolderDataModule(str(tmp_path / "imgs"), image_size=8, batch_size=7, num_workers=0,
                                 val_fraction=0.0, test_fraction=0.0)
    model = ImageClassifier("resnet10t", num_classes=2, in_chans=3)
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png: .*Remove or replace the file"):
        make_trainer(max_steps=1, limit_val_batches=0).fit(model, datamodule=data)


def test_longer_data_sequences_than_the_model_are_refused_before_the_summary(caplog):
    with caplog.at_level(logging.INFO), pytest.raises(
            ValueError, match=r"TextDataModule cuts sequences of `block_size`=64 tokens, longer than the model's "
                              r"`block_size`=32 .*set --data.init_args.block_size 32 or --model.init_args.block_size 64"):
        make_trainer(max_steps=1, enable_model_summary=True).fit(tiny_gpt(), datamodule=TextDataModule(block_size=64, batch_size=8))
    assert "Total params" not in caplog.text


def test_shorter_data_sequences_train_with_a_logger(tmp_path):
    # Lightning refused to merge the model's block_size=64 with the data's block_size=32 hparams
    trainer = make_trainer(max_steps=2, logger=TensorBoardLogger(str(tmp_path)))
    trainer.fit(CausalLM(block_size=64, n_layer=2, n_head=2, n_embd=32), datamodule=TextDataModule(block_size=32, batch_size=8))
    assert trainer.global_step == 2


def test_a_matching_vit_still_trains():
    trainer = make_trainer(max_steps=1)
    trainer.fit(tiny_vit(), datamodule=digits())
    assert trainer.global_step == 1
