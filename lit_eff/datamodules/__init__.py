"""Datamodules with exact, resumable batch order (see :mod:`lit_eff.datamodules.loader`)."""

from lit_eff.datamodules.base import KitDataModule
from lit_eff.datamodules.cifar import CIFAR10DataModule, CIFAR100DataModule
from lit_eff.datamodules.continual import (
    SeqCIFAR10DataModule,
    SeqCIFAR100DataModule,
    SeqDigitsDataModule,
    SequentialTasks,
)
from lit_eff.datamodules.digits import DigitsDataModule
from lit_eff.datamodules.image_folder import ImageFolderDataModule
from lit_eff.datamodules.loader import ResumableLoader
from lit_eff.datamodules.synthetic import SyntheticImageDataModule
from lit_eff.datamodules.text import TextDataModule

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "KitDataModule",
    "ResumableLoader",
    "SeqCIFAR10DataModule",
    "SeqCIFAR100DataModule",
    "SeqDigitsDataModule",
    "SequentialTasks",
    "SyntheticImageDataModule",
    "TextDataModule",
]
