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
