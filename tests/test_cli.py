import glob
import os

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_eff.callbacks import FlopsBudget, FlopsMonitor
from lit_eff.cli import LitEffCLI, main

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
FAST = ["--trainer.max_epochs", "2", "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "2",
        "--trainer.check_val_every_n_epoch", "1", "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false"]


def scalars(run_dir, steps=False):
    acc = EventAccumulator(run_dir)
    acc.Reload()
    return {tag: [e.step if steps else e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_main_job_logs_flops_loss_accuracy_and_tests(capsys, caplog):
    main(["fit", "--config", os.path.join(CONFIGS, "vit_digits.yaml"), *FAST])
    runs = glob.glob("lightning_logs/version_*")
    assert len(runs) == 1
    logged = scalars(runs[0])
    assert {"flops/total", "train/loss", "val/acc", "test/acc"} <= set(logged)
    totals = logged["flops/total"]
    assert totals == sorted(totals) and totals[-1] > 0
    steps = logged["flops/step"]
    assert totals[-1] == pytest.approx(sum(steps), rel=1e-5)  # log_every_n_steps=1: every step logged
    # FLOPs are labelled with Lightning's step convention: each train/loss has its flops/total
    labels = scalars(runs[0], steps=True)
    assert labels["flops/total"] == labels["train/loss"] == list(range(8))
    saved = yaml.safe_load(open(os.path.join(runs[0], "config.yaml")))
    assert saved["model"]["class_path"] == "lit_eff.models.ImageClassifier"
    assert "training FLOPs" in caplog.text  # the FLOPs summary at the end of fit
    assert "test/acc" in capsys.readouterr().out  # the test results table after fit


def test_configs_stack_and_fragments_append_callbacks(tmp_path):
    fragment = tmp_path / "budget.yaml"
    fragment.write_text(yaml.safe_dump({"trainer": {"callbacks+": [
        {"class_path": "lit_eff.callbacks.FlopsBudget", "init_args": {"budget": 1.0e9}}]}}))
    cli = LitEffCLI(args=["--config", os.path.join(CONFIGS, "gpt_text.yaml"), "--config", str(fragment)], run=False)
    kinds = [type(cb) for cb in cli.trainer.callbacks]
    assert FlopsMonitor in kinds and FlopsBudget in kinds
    assert cli.trainer.callbacks[kinds.index(FlopsBudget)].budget == 1.0e9


@pytest.mark.parametrize("config", ["cnn_digits.yaml", "gpt_text.yaml", "vit_cifar10.yaml"])
def test_every_base_config_parses(config, tmp_path):
    args = ["--config", os.path.join(CONFIGS, config)]
    if "cifar" in config:
        (tmp_path / "cifar-10-batches-py").mkdir()
        args += ["--data.init_args.data_dir", str(tmp_path)]
    cli = LitEffCLI(args=args, run=False)
    assert any(isinstance(cb, FlopsMonitor) for cb in cli.trainer.callbacks)


def test_bad_flops_arguments_fail_before_training():
    with pytest.raises(ValueError, match=r"Expected `budget` > 0 \(training FLOPs\), got budget=0"):
        FlopsBudget(budget=0)
    with pytest.raises(ValueError, match=r"Expected `kind` in \('executed', 'effective'\), got kind='dense'"):
        FlopsBudget(budget=1.0, kind="dense")
    with pytest.raises(ValueError, match=r"Expected `plan` to be true .* or false .*, got plan='no'"):
        FlopsBudget(budget=1.0, plan="no")
    with pytest.raises(ValueError, match=r"Expected `peak_flops` > 0 \(FLOP/s of one device\), got peak_flops=-1"):
        FlopsMonitor(peak_flops=-1)


def test_budget_without_monitor_and_two_monitors_are_refused():
    from tests.helpers import digits, make_trainer, tiny_vit

    with pytest.raises(ValueError, match="FlopsBudget needs a FlopsMonitor in trainer.callbacks"):
        make_trainer(max_steps=1, callbacks=[FlopsBudget(1e9)]).fit(tiny_vit(), datamodule=digits())


def test_cifar_config_without_data_fails_with_the_fix(tmp_path):
    # jsonargparse reports the datamodule's FileNotFoundError inside its own ValueError
    with pytest.raises(ValueError, match="no 'cifar-10-batches-py' folder .* Pass `data_dir`"):
        LitEffCLI(args=["--config", os.path.join(CONFIGS, "vit_cifar10.yaml"), "--data.init_args.data_dir",
                        str(tmp_path / "nothing")], run=False)


def test_language_job_tests_and_prints_a_sample(capsys):
    main(["fit", "--config", os.path.join(CONFIGS, "gpt_text.yaml"), "--trainer.max_steps", "3",
          "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "2", "--trainer.limit_test_batches", "2",
          "--trainer.enable_progress_bar", "false"])
    out = capsys.readouterr().out
    assert "test/bpb" in out
    sample = out.split("Sample from the trained model:\n", 1)[1]
    assert len(sample.strip()) > 20


TINY_VIT = ["--model.init_args.model_kwargs",
            "{img_size: 8, patch_size: 2, embed_dim: 32, depth: 2, num_heads: 2, mlp_ratio: 2.0, global_pool: avg}"]


def error_line(capsys, args, code=2):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("extra, message", [
    (["--model.init_args.lr", "-1"], "lit-eff fit: error: Expected `lr` in (0, inf), got lr=-1.0"),
    (["--data.init_args.batch_size", "0"], "lit-eff fit: error: Expected `batch_size` to be an integer >= 1, got batch_size=0"),
    (["--trainer.callbacks+", "lit_eff.callbacks.NMSparsity", "--trainer.callbacks.n", "5"],
     "lit-eff fit: error: Expected `n` < `m`, got n=5, m=4"),
    (["--model.init_args.lrr", "1"], "lit-eff fit: error: --model: Problem with given class_path "
                                     "'lit_eff.models.ImageClassifier': Option 'lrr' is not accepted"),
    (["--config", "missing.yaml"], "lit-eff fit: error: --config: File does not exist: "),
])
def test_argument_errors_end_with_the_kits_message_and_no_traceback(extra, message, capsys):
    line = error_line(capsys, ["fit", "--config", os.path.join(CONFIGS, "vit_digits.yaml"), *extra])
    assert line.startswith(message)


def test_an_argument_error_in_a_real_process_prints_no_traceback(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "lit_eff.cli", "fit", "--config", os.path.join(CONFIGS, "vit_digits.yaml"),
                           "--model.init_args.lr", "-1"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "Union subtypes" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "lit-eff fit: error: Expected `lr` in (0, inf), got lr=-1.0"


def test_help_lists_every_tool_and_every_tool_option_has_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for tool in ("report", "sweep", "search"):
        assert f"\n  {tool}  " in out
    assert "OMP_NUM_THREADS" in out
    from lit_eff import report, sweep

    for parser in (report.parser(), sweep.parser()):
        for action in parser._actions:  # argparse keeps no public list of its options
            assert action.help, f"{parser.prog} {action.option_strings or action.dest} has no help text"


@pytest.fixture(scope="module")
def sparse_checkpoint(tmp_path_factory):
    """A real last.ckpt of a tiny ViT trained 2 steps with NMSparsity 2:4."""
    folder = tmp_path_factory.mktemp("sparse")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        main(["fit", "--config", os.path.join(CONFIGS, "vit_digits.yaml"), "--config",
              os.path.join(CONFIGS, "techniques", "nm_2of4_srste.yaml"), *TINY_VIT, *FAST, "--trainer.max_steps", "2",
              "--test_after_fit", "false"])
    return str(folder / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt")


def test_ckpt_path_of_another_model_is_refused_naming_both(sparse_checkpoint, capsys):
    line = error_line(capsys, ["fit", "--config", os.path.join(CONFIGS, "cnn_digits.yaml"),
                               "--ckpt_path", sparse_checkpoint])
    assert f"--ckpt_path {sparse_checkpoint} holds a lit_eff.models.ImageClassifier whose arguments differ" in line
    assert "model_name: 'resnet10t' in the config, 'vit_tiny_patch16_224' in the checkpoint" in line
    assert f"--model.init_args.init_weights {sparse_checkpoint}" in line
    line = error_line(capsys, ["fit", "--config", os.path.join(CONFIGS, "vit_digits.yaml"), "--config",
                               os.path.join(CONFIGS, "techniques", "nm_2of4_srste.yaml"), *TINY_VIT,
                               "--model.init_args.model_kwargs.embed_dim", "96", "--ckpt_path", sparse_checkpoint])
    assert "model_kwargs.embed_dim: 96 in the config, 32 in the checkpoint" in line


def test_resuming_with_another_technique_stack_names_both(sparse_checkpoint, capsys):
    line = error_line(capsys, ["fit", "--config", os.path.join(CONFIGS, "vit_digits.yaml"), *TINY_VIT,
                               "--ckpt_path", sparse_checkpoint])
    assert line == (f"lit-eff fit: error: --ckpt_path {sparse_checkpoint} was written by a run with techniques "
                    "[NMSparsity], but this run has [dense]. To resume it, use the same technique fragments as that "
                    "run (its config.yaml lists them); to start a new run with other techniques from its weights, pass "
                    f"--model.init_args.init_weights {sparse_checkpoint} instead (masks are hardened into the weights)")


def test_resuming_in_python_with_another_stack_names_both(sparse_checkpoint):
    from tests.helpers import digits, make_trainer, tiny_vit

    with pytest.raises(ValueError, match=r"was written by a run with techniques \[NMSparsity\], but this run has "
                                         r"\[dense\]"):
        make_trainer(max_steps=3).fit(tiny_vit(), datamodule=digits(), ckpt_path=sparse_checkpoint)


@pytest.mark.parametrize("content, why", [
    (b"", "the file is empty"),
    (b"hello\n", "a text file, not a PyTorch checkpoint (it starts with 'hello\\n')"),
    ("truncated", "the file is truncated or damaged"),
    ("state_dict", "it holds a plain state dict, not a Lightning checkpoint"),
])
def test_an_unreadable_checkpoint_is_named(content, why, sparse_checkpoint, capsys, tmp_path):
    import torch

    path = tmp_path / "bad.ckpt"
    if content == "truncated":
        path.write_bytes(open(sparse_checkpoint, "rb").read()[:4000])
    elif content == "state_dict":
        torch.save({"weight": torch.zeros(2)}, path)
    else:
        path.write_bytes(content)
    line = error_line(capsys, ["fit", "--config", os.path.join(CONFIGS, "vit_digits.yaml"), "--ckpt_path", str(path)])
    assert line.startswith(f"lit-eff fit: error: cannot read checkpoint {path}: {why}")


def test_summary_has_no_empty_flops_column_and_no_tips(caplog):
    import logging

    with caplog.at_level(logging.INFO):
        main(["fit", "--config", os.path.join(CONFIGS, "vit_digits.yaml"), *TINY_VIT, *FAST, "--trainer.max_steps", "1",
              "--trainer.enable_model_summary", "true", "--test_after_fit", "false"])
    assert "Total params" in caplog.text and "VisionTransformer" in caplog.text
    assert "FLOPs" not in caplog.text.split("Total params")[0] and "Total Flops" not in caplog.text
    assert "Tip:" not in caplog.text and "litlogger" not in caplog.text


def test_every_fit_ends_with_a_validation_point_and_a_finished_mark():
    # check_val_every_n_epoch 50 (the main job's) and 5 steps: Lightning validates never
    main(["fit", "--config", os.path.join(CONFIGS, "vit_digits.yaml"), *TINY_VIT, "--trainer.max_steps", "5",
          "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false", "--test_after_fit", "false"])
    logged = scalars("lightning_logs/version_0", steps=True)
    assert logged["val/acc"] == [5] and logged["run/finished"] == [4]
    assert max(logged["flops/total"]) == 4  # the val point sits after the last step's FLOPs
