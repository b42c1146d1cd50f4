"""A user's own images in class folders (torchvision ``ImageFolder``)."""

from __future__ import annotations

import os

import torch
from torch.utils.data import Subset

from lit_eff.datamodules.augment import normalize, random_flip, random_shift
from lit_eff.datamodules.base import KitDataModule
from lit_eff.datamodules.splits import split_indices
from lit_eff.validation import check_fraction, check_int

_IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])
_IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])


def read_image(path: str):
    """An RGB PIL image, or an error naming the file (read lazily, when its batch is loaded)."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as err:  # noqa: BLE001  PIL raises many kinds for a bad file
        raise ValueError(f"ImageFolderDataModule: cannot read image {path}: {err}. Remove or replace the file") \
            from None


class ImageFolderDataModule(KitDataModule):
    """Images under ``root/<class>/*.png|jpg...``, or ``root/train``, ``root/val`` and
    ``root/test`` each laid out that way. Without split folders, ``root`` is split with
    ``val_fraction``/``test_fraction`` (seeded by ``split_seed``). Images are resized and
    center-cropped to ``image_size`` in worker processes; training batches then get a random
    shift of ``image_size // 8`` pixels and horizontal flips.

    Example::

        data:
          class_path: lit_eff.datamodules.ImageFolderDataModule
          init_args: {root: /data/flowers, image_size: 64, batch_size: 64, num_workers: 4}

    A file that cannot be read as an image stops training with an error naming it.
    """

    in_chans = 3

    def __init__(
        self,
        root: str,
        image_size: int = 224,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        num_workers: int = 2,
        seed: int | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        check_int("image_size", image_size, minimum=1)
        check_fraction("val_fraction", val_fraction, high_open=True)
        check_fraction("test_fraction", test_fraction, high_open=True)
        check_fraction("val_fraction + test_fraction", val_fraction + test_fraction, high_open=True)
        self.save_hyperparameters(logger=False)  # not merged with the model's (see KitDataModule)
        self.root = os.path.expanduser(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"ImageFolderDataModule: `root`={root!r} is not a folder")
        self.image_size, self.split_seed = image_size, split_seed
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.classes: list[str] = []

    def _folder(self, path: str):
        from torchvision import transforms
        from torchvision.datasets import ImageFolder

        transform = transforms.Compose([
            transforms.Resize(self.image_size),
            transforms.CenterCrop(self.image_size),
            transforms.PILToTensor(),
        ])
        try:
            return ImageFolder(path, transform=transform, loader=read_image)
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"ImageFolderDataModule: {path!r} holds no images in class folders ({err}). Expected "
                "`root/<class>/<image>` or `root/train/<class>/<image>`."
            ) from err

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def setup(self, stage: str | None = None) -> None:
        if self.train_data is not None:
            return
        train_dir = os.path.join(self.root, "train")
        if os.path.isdir(train_dir):
            self.train_data = self._folder(train_dir)
            self.classes = self.train_data.classes
            for split in ("val", "test"):
                path = os.path.join(self.root, split)
                setattr(self, f"{split}_data", self._folder(path) if os.path.isdir(path) else None)
            if self.val_data is None:
                self.val_data = self.test_data
            if self.test_data is None:
                self.test_data = self.val_data
            if self.val_data is None:
                raise FileNotFoundError(f"ImageFolderDataModule: {self.root!r} has train/ but neither val/ nor test/")
        else:
            full = self._folder(self.root)
            self.classes = full.classes
            train, val, test = split_indices(len(full), self.val_fraction, self.test_fraction, self.split_seed)
            self.train_data = Subset(full, train.tolist())
            self.val_data = Subset(full, val.tolist())
            self.test_data = Subset(full, test.tolist())

    def train_transform(self, batch, gen):
        images, labels = batch
        images = random_flip(random_shift(images.float() / 255.0, max(1, self.image_size // 8), gen), gen)
        return normalize(images, _IMAGENET_MEAN, _IMAGENET_STD), labels

    def eval_transform(self, batch, gen):
        images, labels = batch
        return normalize(images.float() / 255.0, _IMAGENET_MEAN, _IMAGENET_STD), labels
