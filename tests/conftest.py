import os

import pytest
import torch

os.environ.setdefault("PL_DISABLE_FORK", "1")
# tiny models run fastest on one thread, and two-process DDP tests then use the two cores
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolate_cwd(tmp_path, monkeypatch):
    """Every test runs in its own folder so lightning_logs/ never lands in the repository."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
