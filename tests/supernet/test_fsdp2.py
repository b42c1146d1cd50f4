"""FSDP2 (ModelParallelStrategy, one fully_shard unit per block, two CPU processes with gloo) trains
a supernet exactly as DDP does (tests/supernet/fsdp2_runner.py), DεpS's shrink-start
reorganization of sharded weights and optimizer state included."""

import os
import subprocess
import sys

import pytest
import torch

from tests.contract.test_contract import assert_same_state
from tests.helpers import max_abs_diff


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("supernet_fsdp2")
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    done = subprocess.run([sys.executable, "-m", "tests.supernet.fsdp2_runner", str(out)], cwd=root,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def load(folder, rank):
    assert not (folder / "error.txt").exists(), (folder / "error.txt").read_text()
    return torch.load(folder / f"rank{rank}.pt", weights_only=False)


@pytest.mark.parametrize("case", ["vit-perf", "gpt-uniform-checkpointed", "vit-deps"])
def test_fsdp2_equals_ddp(case, runs):
    reference = load(runs / case / "ddp", 0)
    assert len({tuple(s) for s in reference["subnets"]}) > 1
    if case.startswith("gpt-uniform"):  # some steps leave the second block unused (zero gradients, as DDP)
        assert any(all("depth 1" in name for name in step) for step in reference["subnets"])
    for rank in (0, 1):
        sharded = load(runs / case / "fsdp2", rank)
        assert sharded["step"] == reference["step"] == 6
        assert sharded["subnets"] == reference["subnets"]
        assert max_abs_diff(sharded["weights"], reference["weights"]) <= 1e-5
        assert_same_state(sharded["sampler"], reference["sampler"], tol=1e-5)
