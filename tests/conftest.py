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


@pytest.fixture(autouse=True)
def _isolate_distributed():
    """A test that runs a one-process DDP trainer in this process leaves a process group (whose
    store holds MASTER_PORT) and Lightning's environment variables behind; later two-process
    tests would then try the same port. Restore both after every test."""
    saved = dict(os.environ)
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for key in set(os.environ) - set(saved):
        del os.environ[key]
    os.environ.update(saved)
