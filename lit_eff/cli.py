"""The ``lit-eff`` command: LightningCLI over any LightningModule and LightningDataModule.

    lit-eff fit --config configs/vit_digits.yaml --config configs/techniques/some_technique.yaml
    lit-eff test --config configs/vit_digits.yaml --ckpt_path lightning_logs/version_0/checkpoints/last.ckpt

Models, datamodules and callbacks are chosen by ``class_path`` (the kit's classes also by their
short names). Technique fragments append callbacks with ``trainer.callbacks+:``. After ``fit``,
the test split is evaluated with the final weights unless ``--test_after_fit false``, and a
language model prints a sample of generated text.

``lit-eff report ...`` and ``lit-eff sweep ...`` compare runs at equal FLOPs; see
:mod:`lit_eff.report` and :mod:`lit_eff.sweep`. ``lit-eff search ...`` searches a trained supernet
checkpoint for the best subnet under a FLOPs budget (:mod:`lit_eff.supernet.search`).
"""

from __future__ import annotations

import importlib
import sys

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

import lit_eff.callbacks  # noqa: F401  (registers short class names)
import lit_eff.datamodules  # noqa: F401
import lit_eff.models  # noqa: F401
import lit_eff.supernet  # noqa: F401


class LitEffCLI(LightningCLI):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("seed_everything_default", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(LightningModule, LightningDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="After fit, evaluate the test split with the final weights")

    def after_fit(self) -> None:
        config = self.config.get(self.subcommand, self.config)
        datamodule = self.datamodule
        has_test = datamodule is not None and type(datamodule).test_dataloader is not LightningDataModule.test_dataloader
        if config.get("test_after_fit", True) and has_test and not self.trainer.interrupted:
            self.trainer.test(self.model, datamodule=datamodule)
        if hasattr(self.model, "generate") and self.trainer.is_global_zero:
            print(f"\nSample from the trained model:\n{self.model.generate(max_new_tokens=200)}\n")


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    tools = {"report": "lit_eff.report", "sweep": "lit_eff.sweep", "search": "lit_eff.supernet.search"}
    if argv and argv[0] in tools:  # argparse tools, not LightningCLI subcommands
        return importlib.import_module(tools[argv[0]]).cli(argv[1:])
    LitEffCLI(args=args)


if __name__ == "__main__":
    main()
