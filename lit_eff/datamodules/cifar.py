"""CIFAR-10 and CIFAR-100 from torchvision, held in memory as uint8 and augmented per batch."""

from __future__ import annotations

import os

import torch

from lit_eff.datamodules.augment import normalize, random_flip, random_shift
from lit_eff.datamodules.base import KitDataModule
from lit_eff.datamodules.splits import split_indices
from lit_eff.validation import check_fraction


class CIFAR10DataModule(KitDataModule):
    """CIFAR-10 (torchvision). ``data_dir`` holds (or receives, with ``download: true``) the
    extracted ``cifar-10-batches-py`` folder. The official training set is split into train and
    val (``val_fraction``, seeded by ``split_seed``); the official test set is the test split.
    Training batches get a random 4-pixel shift (pad-and-crop) and horizontal flips.

    Example::

        data:
          class_path: lit_eff.datamodules.CIFAR10DataModule
          init_args: {data_dir: data, download: false, batch_size: 128}
    """

    num_classes = 10
    in_chans = 3
    image_size = 32
    folder = "cifar-10-batches-py"
    mean = torch.tensor([0.4914, 0.4822, 0.4465])
    std = torch.tensor([0.2470, 0.2435, 0.2616])

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = False,
        batch_size: int = 128,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        num_workers: int = 0,
        seed: int | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        check_fraction("val_fraction", val_fraction, high_open=True)
        self.save_hyperparameters(logger=False)  # not merged with the model's (see KitDataModule)
        self.data_dir, self.download = os.path.expanduser(data_dir), download
        self.val_fraction, self.split_seed = val_fraction, split_seed
        if not download and not self._present():
            raise FileNotFoundError(self._missing_message())

    def _present(self) -> bool:
        return os.path.isdir(os.path.join(self.data_dir, self.folder))

    def _missing_message(self, reason: str = "") -> str:
        name = type(self).__name__
        return (
            f"{name}: no {self.folder!r} folder in data_dir={self.data_dir!r}{reason}. Pass `data_dir` of a "
            f"folder holding an extracted copy of the dataset ({self.folder}/), or `download: true` on a machine "
            "that can reach the internet."
        )

    def prepare_data(self) -> None:
        if self.download and not self._present():
            try:
                self._dataset_class()(self.data_dir, train=True, download=True)
                self._dataset_class()(self.data_dir, train=False, download=True)
            except Exception as err:  # URLError, HTTPError, timeouts: no network
                raise RuntimeError(self._missing_message(f" and the download failed ({err})")) from err

    def _dataset_class(self):
        from torchvision.datasets import CIFAR10

        return CIFAR10

    def setup(self, stage: str | None = None) -> None:
        if self.train_data is not None:
            return
        if not self._present():
            raise FileNotFoundError(self._missing_message())
        cls = self._dataset_class()
        full, test = cls(self.data_dir, train=True), cls(self.data_dir, train=False)

        def tensors(ds):
            images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW
            return images, torch.tensor(ds.targets, dtype=torch.long)

        images, labels = tensors(full)
        train, val, _ = split_indices(len(labels), self.val_fraction, 0.0, self.split_seed)
        self.train_data = (images[train], labels[train])
        self.val_data = (images[val], labels[val])
        self.test_data = tensors(test)

    def train_transform(self, batch, gen):
        images, labels = batch
        images = random_flip(random_shift(images.float() / 255.0, 4, gen), gen)
        return normalize(images, self.mean, self.std), labels

    def eval_transform(self, batch, gen):
        images, labels = batch
        return normalize(images.float() / 255.0, self.mean, self.std), labels


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 (torchvision); see :class:`CIFAR10DataModule`. Folder: ``cifar-100-python``."""

    num_classes = 100
    folder = "cifar-100-python"
    mean = torch.tensor([0.5071, 0.4865, 0.4409])
    std = torch.tensor([0.2673, 0.2564, 0.2762])

    def _dataset_class(self):
        from torchvision.datasets import CIFAR100

        return CIFAR100
