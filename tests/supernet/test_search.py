"""`lit-eff search`: finds the best subnet under a budget, saves it as plain data that loads with a
one-liner, and refuses bad arguments and unreadable or foreign checkpoints in one line, before any
work."""

import os
import re

import pytest
import torch

from lit_eff.supernet import SubnetConfig, SupernetModule, load_subnet
from lit_eff.supernet.search import SearchInputError, cli, parser, search
from lit_eff.supernet.search import run as search_cli
from tests.helpers import digits
from tests.supernet.test_module import fit


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("supernet_ckpt")
    fit("vit", ckpt_dir=folder, max_steps=3)
    return folder / "step=3.ckpt"


def test_search_and_cli(checkpoint, tmp_path):
    module = SupernetModule.load_from_checkpoint(str(checkpoint))
    dm = digits()
    dm.setup("fit")
    batches = list(dm.val_dataloader())[:2]
    smallest = module.subnet_flops(module.space.min())
    with pytest.raises(ValueError, match=rf"budget of at least the smallest subnet's {smallest / 1e6:.4g} MFLOPs"):
        search(module, batches, smallest * 0.9)
    budget = module.subnet_flops(module.space.max()) * 0.6
    best, results = search(module, batches, budget, "evolution", candidates=10, population=4, seed=1)
    assert best.flops <= budget and len(results) == 10
    assert best.metric == max(r.metric for r in results if r.flops <= budget)
    again, _ = search(module, batches, budget, "evolution", candidates=10, population=4, seed=1)
    assert again.config == best.config  # seeded
    out = tmp_path / "out"
    chosen = search_cli(["--ckpt", str(checkpoint), "--budget-mflops", str(budget / 1e6),
                         "--method", "random", "--candidates", "6", "--batches", "1", "--out", str(out)])
    assert {"pareto.png", "search.json", "subnet.pt"} <= set(os.listdir(out))
    saved = torch.load(out / "subnet.pt", weights_only=True)  # plain data
    assert saved["name"] == str(chosen.config) and SubnetConfig.from_dict(saved["config"]) == chosen.config
    subnet = load_subnet(str(out / "subnet.pt"))  # the documented one-liner
    x = batches[0][0][:4]
    loaded = SupernetModule.load_from_checkpoint(str(checkpoint))
    with torch.no_grad():
        assert (subnet(x) - loaded(x, chosen.config)).abs().max() <= 1e-5



def one_line_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def test_bad_arguments_fail_before_reading_the_checkpoint(capsys, tmp_path):
    missing = str(tmp_path / "missing.ckpt")  # never read: the argument is checked first
    for args, message in [
        (["--budget-mflops", "nan"], "Expected `--budget-mflops` to be a positive, finite number of MFLOPs, got nan"),
        (["--budget-mflops", "-1"], "Expected `--budget-mflops` to be a positive, finite number of MFLOPs, got -1.0"),
        (["--budget-mflops", "1", "--batches", "0"], "Expected `--batches` >= 1, got 0"),
        (["--budget-mflops", "1", "--population", "1"], "Expected `--population` >= 2, got 1"),
    ]:
        assert one_line_error(capsys, ["--ckpt", missing, *args]) == f"lit-eff search: error: {message}"


def test_unreadable_and_foreign_checkpoints_are_named(capsys, tmp_path, checkpoint):
    files = {"empty.ckpt": b"", "text.ckpt": b"not a checkpoint\n",
             "truncated.ckpt": checkpoint.read_bytes()[:5000]}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"state_dict": {}, "hyper_parameters": {"model_name": "vit_tiny", "num_classes": 10}},
               tmp_path / "classifier.ckpt")
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "pickled.ckpt")
    (tmp_path / "sharded.ckpt").mkdir()
    expected = {
        "missing.ckpt": "does not exist",
        "empty.ckpt": "is empty",
        "text.ckpt": r"is not a complete PyTorch checkpoint \(truncated, or not written by torch.save\)",
        "truncated.ckpt": r"is not a complete PyTorch checkpoint",
        "classifier.ckpt": r"is not a SupernetModule checkpoint \(hyperparameters: model_name, num_classes\)",
        "pickled.ckpt": r"holds objects other than tensors and plain data.*torch.nn.modules.linear.Linear",
        "sharded.ckpt": r"is a folder; pass a checkpoint file",
    }
    for name, pattern in expected.items():
        path = str(tmp_path / name)
        line = one_line_error(capsys, ["--ckpt", path, "--budget-mflops", "1"])
        assert line.startswith(f"lit-eff search: error: Checkpoint {path} "), line
        assert re.search(pattern, line), line
    with pytest.raises(SearchInputError, match="is empty"):  # the Python entry raises instead
        search_cli(["--ckpt", str(tmp_path / "empty.ckpt"), "--budget-mflops", "1"])


def test_budget_below_the_smallest_subnet_is_one_line(capsys, checkpoint):
    line = one_line_error(capsys, ["--ckpt", str(checkpoint), "--budget-mflops", "0.001"])
    assert "Expected a FLOPs budget of at least the smallest subnet's" in line
    assert "(width 16 · depth 1 · heads 1 · mlp 1)" in line


def test_every_option_has_help():
    options = [a for a in parser()._actions if a.option_strings and a.dest != "help"]
    assert {a.dest for a in options} >= {"ckpt", "budget_mflops", "method", "candidates", "population", "seed",
                                          "batches", "batch_size", "out"}
    assert all(a.help and len(a.help) > 10 for a in options), [a.dest for a in options if not a.help]
    assert "load_subnet" in parser().format_help()
