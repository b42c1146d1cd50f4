import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

from lit_eff.datamodules.splits import split_indices
from lit_eff.datamodules import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    DigitsDataModule,
    ImageFolderDataModule,
    SyntheticImageDataModule,
)


def test_digits_split_is_fixed_and_disjoint_and_training_batches_are_augmented():
    dm = DigitsDataModule(batch_size=16, max_shift=1)
    dm.setup()
    sizes = [len(dm.train_data[0]), len(dm.val_data[0]), len(dm.test_data[0])]
    assert sum(sizes) == 1797 and sizes[2] == round(1797 * 0.2)
    other = DigitsDataModule(batch_size=16, seed=123)
    other.setup()
    assert torch.equal(dm.test_data[0], other.test_data[0]), "the run seed must not move the test split"
    train, val, test = split_indices(1797, 0.1, 0.2, seed=0)
    assert len(set(train.tolist()) | set(val.tolist()) | set(test.tolist())) == 1797
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 8, 8) and y.dtype == torch.long
    plain = DigitsDataModule(batch_size=16, max_shift=0)
    plain.setup()
    x0, y0 = next(iter(plain.train_dataloader()))
    assert torch.equal(y, y0) and not torch.equal(x, x0), "max_shift=1 must shift some training images"
    xv, _ = next(iter(dm.val_dataloader()))
    assert abs(xv.mean().item()) < 0.3, "images are normalised"


def test_synthetic_images_have_the_requested_shape():
    dm = SyntheticImageDataModule(image_size=12, in_chans=3, num_classes=5, num_samples=40, batch_size=8)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 12, 12) and int(y.max()) < 5
    assert len(dm.train_dataloader()) == 5


def _write_cifar10(root, n=20):
    import pickle

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = {"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, n))}
        with open(folder / name, "wb") as f:
            pickle.dump(data, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)


def test_cifar10_reads_an_extracted_copy(tmp_path, monkeypatch):
    _write_cifar10(tmp_path)
    # the fake files lack the real md5 sums
    monkeypatch.setattr("torchvision.datasets.CIFAR10._check_integrity", lambda self: True)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args, **kwargs: True)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), batch_size=8, val_fraction=0.1)
    dm.setup()
    assert len(dm.train_data[0]) + len(dm.val_data[0]) == 100 and len(dm.test_data[0]) == 20
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32


def test_cifar_missing_data_without_download_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no 'cifar-10-batches-py' folder in data_dir=.*Pass `data_dir`"):
        CIFAR10DataModule(data_dir=str(tmp_path), download=False)
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        CIFAR100DataModule(data_dir=str(tmp_path), download=False)


def test_cifar_failed_download_says_what_to_pass(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torchvision.datasets.utils.download_and_extract_archive", offline)
    monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive", offline)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), download=True)
    with pytest.raises(RuntimeError, match=r"download failed .*no network.*Pass `data_dir`"):
        dm.prepare_data()


def _write_images(root, classes=("cat", "dog"), per_class=6, size=10):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_image_folder_splits_a_single_folder(tmp_path):
    _write_images(tmp_path / "imgs")
    dm = ImageFolderDataModule(str(tmp_path / "imgs"), image_size=8, batch_size=4, val_fraction=0.25,
                               test_fraction=0.25, num_workers=0)
    dm.setup()
    assert dm.num_classes == 2
    assert (len(dm.train_data), len(dm.val_data), len(dm.test_data)) == (6, 3, 3)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 8, 8) and set(y.tolist()) <= {0, 1}


def test_image_folder_uses_train_and_val_folders(tmp_path):
    _write_images(tmp_path / "train")
    _write_images(tmp_path / "val", per_class=2)
    dm = ImageFolderDataModule(str(tmp_path), image_size=8, batch_size=4, num_workers=0)
    dm.setup()
    assert len(dm.train_data) == 12 and len(dm.val_data) == 4 and dm.test_data is dm.val_data


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        ImageFolderDataModule(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    dm = ImageFolderDataModule(str(tmp_path / "empty"), num_workers=0)
    with pytest.raises(FileNotFoundError, match="holds no images in class folders"):
        dm.setup()


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), r"Expected `batch_size` to be an integer >= 1, got batch_size=0"),
    (dict(batch_size=-3), r"Expected `batch_size` to be an integer >= 1, got batch_size=-3"),
    (dict(val_fraction=1.2), r"Expected `val_fraction` in \[0, 1\), got val_fraction=1.2"),
    (dict(val_fraction=0.5, test_fraction=0.6), r"val_fraction \+ test_fraction"),
    (dict(max_shift=-1), r"Expected `max_shift` to be an integer >= 0, got max_shift=-1"),
])
def test_digits_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DigitsDataModule(**kwargs)


def test_batch_larger_than_the_training_split_is_refused():
    dm = DigitsDataModule(batch_size=5000)
    dm.setup()
    with pytest.raises(ValueError, match=r"Expected `batch_size` <= the 1258 training samples"):
        dm.train_dataloader()
