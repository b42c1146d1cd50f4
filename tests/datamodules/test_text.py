import pytest
import torch

from lit_eff.datamodules import TextDataModule


def test_default_text_is_pythons_bundled_documentation():
    dm = TextDataModule(block_size=64, batch_size=4)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (4, 64) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1]), "targets are the inputs shifted by one"
    total = sum(len(split[0]) for split in (dm.train_data, dm.val_data, dm.test_data)) * 64
    assert total > 400_000
    assert "the" in bytes(dm.train_data[0][:50].flatten().tolist()).decode("utf-8", "replace")


def test_contiguous_split_of_a_users_files(tmp_path):
    (tmp_path / "a.txt").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("hello world " * 40)
    for path in [str(tmp_path), str(tmp_path / "**" / "*.*")]:
        dm = TextDataModule(path=path, block_size=16, batch_size=2, val_fraction=0.1, test_fraction=0.1)
        dm.setup()
        assert len(dm.files) == 2
        train_end = dm.train_data[0].flatten()
        assert train_end[:256].tolist() == list(range(256)), "the train split starts at the first byte"
        assert len(dm.val_data[0]) >= 1 and len(dm.test_data[0]) >= 1


def test_missing_path_empty_text_and_bad_sizes(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"`path`='.*nope' is no file, folder or glob match"):
        TextDataModule(path=str(tmp_path / "nope"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="holds no text"):
        TextDataModule(path=str(tmp_path / "empty.txt"))
    with pytest.raises(ValueError, match=r"Expected `block_size` to be an integer >= 1, got block_size=0"):
        TextDataModule(block_size=0)
    with pytest.raises(ValueError, match=r"Expected `batch_size` to be an integer >= 1, got batch_size=-1"):
        TextDataModule(batch_size=-1)
    (tmp_path / "short.txt").write_text("tiny text")
    dm = TextDataModule(path=str(tmp_path / "short.txt"), block_size=64)
    with pytest.raises(ValueError, match=r"the train split has \d+ bytes, fewer than `block_size` \+ 1 = 65"):
        dm.setup()
