"""Byte-level language-modelling data from the user's text, or Python's own documentation."""

from __future__ import annotations

import glob
import os

import torch

from lit_eff.datamodules.base import KitDataModule
from lit_eff.validation import check_fraction, check_int


def bundled_text() -> bytes:
    """The English documentation text that ships inside every CPython (``pydoc_data.topics``)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")


def resolve_text_files(path: str) -> list[str]:
    """The files a ``path`` names: a file, every file under a folder, or a glob's matches."""
    path = os.path.expanduser(path)
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        files = [os.path.join(d, f) for d, _, names in os.walk(path) for f in names]
    else:
        files = [f for f in glob.glob(path, recursive=True) if os.path.isfile(f)]
    return sorted(files)


class TextDataModule(KitDataModule):
    """Byte-level tokens (vocabulary 256) cut into fixed blocks of ``block_size``.

    ``path`` names a file, a folder (every file below it) or a glob; by default the text is
    Python's bundled documentation (about 470 kB of English with code). The byte stream is
    split contiguously: the first part trains, then validation, then test (``val_fraction``,
    ``test_fraction``). Each sample is (``x``, ``y``): ``block_size`` bytes and the same bytes
    shifted by one.

    Example::

        data:
          class_path: lit_eff.datamodules.TextDataModule
          init_args: {path: null, block_size: 256, batch_size: 32}
    """

    vocab_size = 256

    def __init__(
        self,
        path: str | None = None,
        block_size: int = 256,
        batch_size: int = 32,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        seed: int | None = None,
    ) -> None:
        super().__init__(batch_size, 0, seed)
        check_int("block_size", block_size, minimum=1)
        check_fraction("val_fraction", val_fraction, high_open=True)
        check_fraction("test_fraction", test_fraction, high_open=True)
        check_fraction("val_fraction + test_fraction", val_fraction + test_fraction, high_open=True)
        self.save_hyperparameters(logger=False)  # not merged with the model's (see KitDataModule)
        self.path, self.block_size = path, block_size
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.files: list[str] = []
        if path is not None:
            self.files = resolve_text_files(path)
            if not self.files:
                raise FileNotFoundError(f"TextDataModule: `path`={path!r} is no file, folder or glob match")
            if sum(os.path.getsize(f) for f in self.files) == 0:
                raise ValueError(f"TextDataModule: `path`={path!r} holds no text ({len(self.files)} empty file(s))")

    def read_bytes(self) -> bytes:
        if self.path is None:
            return bundled_text()
        return b"\n".join(open(f, "rb").read() for f in self.files)

    def _blocks(self, data: torch.Tensor, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.block_size
        if len(data) < t + 1:
            raise ValueError(
                f"TextDataModule: the {split} split has {len(data)} bytes, fewer than `block_size` + 1 = {t + 1};"
                " lower `block_size` or give more text"
            )
        n = (len(data) - 1) // t
        x = data[: n * t].view(n, t)
        y = data[1 : n * t + 1].view(n, t)
        return x, y

    def setup(self, stage: str | None = None) -> None:
        if self.train_data is not None:
            return
        data = torch.frombuffer(bytearray(self.read_bytes()), dtype=torch.uint8)
        n_val = int(len(data) * self.val_fraction)
        n_test = int(len(data) * self.test_fraction)
        n_train = len(data) - n_val - n_test
        self.train_data = self._blocks(data[:n_train], "train")
        self.val_data = self._blocks(data[n_train : n_train + n_val], "val") if n_val else None
        self.test_data = self._blocks(data[n_train + n_val :], "test") if n_test else None

    def eval_transform(self, batch, gen):
        x, y = batch
        return x.long(), y.long()
