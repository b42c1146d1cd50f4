"""Random images of a chosen size: for benchmarks, where only shapes matter."""

from __future__ import annotations

import torch

from lit_eff.datamodules.base import KitDataModule
from lit_eff.seeding import generator
from lit_eff.validation import check_int


class SyntheticImageDataModule(KitDataModule):
    """Gaussian-noise images with random labels (seeded), kept in memory.

    Example::

        data:
          class_path: lit_eff.datamodules.SyntheticImageDataModule
          init_args: {image_size: 32, in_chans: 3, num_classes: 10, batch_size: 64}
    """

    def __init__(
        self,
        image_size: int = 32,
        in_chans: int = 3,
        num_classes: int = 10,
        num_samples: int = 1024,
        num_eval_samples: int = 256,
        batch_size: int = 64,
        seed: int | None = None,
    ) -> None:
        super().__init__(batch_size, 0, seed)
        for name, value in [("image_size", image_size), ("in_chans", in_chans), ("num_classes", num_classes),
                            ("num_samples", num_samples), ("num_eval_samples", num_eval_samples)]:
            check_int(name, value, minimum=1)
        self.save_hyperparameters(logger=False)  # not merged with the model's (see KitDataModule)
        self.image_size, self.in_chans, self.num_classes = image_size, in_chans, num_classes
        self.num_samples, self.num_eval_samples = num_samples, num_eval_samples

    def _make(self, n: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        gen = generator("synthetic", split, self.image_size, self.in_chans)
        images = torch.randn(n, self.in_chans, self.image_size, self.image_size, generator=gen)
        labels = torch.randint(0, self.num_classes, (n,), generator=gen)
        return images, labels

    def setup(self, stage: str | None = None) -> None:
        if self.train_data is None:
            self.train_data = self._make(self.num_samples, "train")
            self.val_data = self._make(self.num_eval_samples, "val")
            self.test_data = self._make(self.num_eval_samples, "test")
