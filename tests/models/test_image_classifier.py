import pytest

from lit_eff.models import ImageClassifier, create_timm_model
import torch.nn.functional as F

from tests.helpers import digits, make_trainer, mean_val_loss, seeded, tiny_cnn, tiny_vit


def test_unknown_timm_model_suggests_close_matches():
    with pytest.raises(ValueError, match=r"Unknown timm model `model_name`='vit_tiny_patch16_22'.*vit_tiny_patch16_224"):
        ImageClassifier("vit_tiny_patch16_22")
    with pytest.raises(ValueError, match="Unknown timm model"):
        create_timm_model("definitely_not_a_model_xyz")


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=0), r"Expected `lr` in \(0, inf\), got lr=0"),
    (dict(weight_decay=-1), r"Expected `weight_decay` in \[0, inf\), got weight_decay=-1"),
    (dict(num_classes=0), r"Expected `num_classes` to be an integer >= 1, got num_classes=0"),
    (dict(label_smoothing=1.0), r"Expected `label_smoothing` in \[0, 1\)"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ImageClassifier("resnet10t", **kwargs)


@pytest.mark.parametrize("make, min_drop, min_acc", [(tiny_vit, 0.02, 0.12), (tiny_cnn, 0.3, 0.3)])
def test_classifier_trains_and_logs(make, min_drop, min_acc):
    seeded()
    model, dm = make(lr=1e-2 if make is tiny_vit else 3e-3, warmup=0.0), digits()
    ce = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
    before = mean_val_loss(model, dm, ce)
    trainer = make_trainer(max_epochs=3, limit_train_batches=20, limit_val_batches=None)
    trainer.fit(model, datamodule=dm)
    metrics = trainer.callback_metrics
    assert {"train/loss", "val/loss", "val/acc"} <= set(metrics)
    assert metrics["val/loss"] < before - min_drop, f"val/loss did not fall: {before} -> {metrics['val/loss']}"
    assert metrics["val/acc"] > min_acc, "60 steps beat chance (0.1) on digits"
    assert not model.hparams.pretrained
    test = trainer.test(model, datamodule=digits(), verbose=False)[0]
    assert {"test/acc", "test/loss"} <= set(test)


def test_lightning_cli_optimizer_options_replace_the_default():
    from lit_eff.cli import LitEffCLI

    cli = LitEffCLI(args=["--model", "lit_eff.models.ImageClassifier", "--model.model_name", "resnet10t",
                          "--model.in_chans", "1", "--data", "lit_eff.datamodules.DigitsDataModule",
                          "--optimizer", "SGD", "--optimizer.lr", "0.05"], run=False)
    optim = cli.model.configure_optimizers()
    optimizer = optim[0] if isinstance(optim, (list, tuple)) else optim
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    assert type(optimizer).__name__ == "SGD" and optimizer.param_groups[0]["lr"] == 0.05
