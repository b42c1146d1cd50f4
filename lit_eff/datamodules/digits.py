"""scikit-learn's bundled handwritten digits (1,797 8x8 grey images): the kit's offline default."""

from __future__ import annotations

import torch

from lit_eff.datamodules.augment import normalize, random_shift
from lit_eff.datamodules.base import KitDataModule
from lit_eff.datamodules.splits import split_indices
from lit_eff.validation import check_fraction, check_int


class DigitsDataModule(KitDataModule):
    """8x8 handwritten digits from ``sklearn.datasets.load_digits`` (no download).

    A seeded split (``split_seed``, fixed across runs so every run tests on the same images)
    into train/val/test; training batches get random shifts of up to ``max_shift`` pixels.

    Example::

        data:
          class_path: lit_eff.datamodules.DigitsDataModule
          init_args: {batch_size: 64, max_shift: 1}
    """

    num_classes = 10
    in_chans = 1
    image_size = 8

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        max_shift: int = 1,
        split_seed: int = 0,
        num_workers: int = 0,
        seed: int | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        check_fraction("val_fraction", val_fraction, high_open=True)
        check_fraction("test_fraction", test_fraction, high_open=True)
        check_fraction("val_fraction + test_fraction", val_fraction + test_fraction, high_open=True)
        check_int("max_shift", max_shift, minimum=0)
        self.save_hyperparameters(logger=False)  # not merged with the model's (see KitDataModule)
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.max_shift, self.split_seed = max_shift, split_seed

    def setup(self, stage: str | None = None) -> None:
        if self.train_data is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.tensor(digits.target, dtype=torch.long)
        train, val, test = split_indices(len(labels), self.val_fraction, self.test_fraction, self.split_seed)
        self.mean = images[train].mean().reshape(1)
        self.std = images[train].std().reshape(1)
        self.train_data = (images[train], labels[train])
        self.val_data = (images[val], labels[val])
        self.test_data = (images[test], labels[test])

    def train_transform(self, batch, gen):
        images, labels = batch
        return normalize(random_shift(images, self.max_shift, gen), self.mean, self.std), labels

    def eval_transform(self, batch, gen):
        images, labels = batch
        return normalize(images, self.mean, self.std), labels
