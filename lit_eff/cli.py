"""The ``lit-eff`` command: LightningCLI over any LightningModule and LightningDataModule.

    lit-eff fit --config configs/vit_digits.yaml --config configs/techniques/some_technique.yaml
    lit-eff fit --config configs/vit_digits.yaml --ckpt_path lightning_logs/version_0/checkpoints/last.ckpt
    lit-eff test --config configs/vit_digits.yaml --ckpt_path lightning_logs/version_0/checkpoints/last.ckpt

Models, datamodules and callbacks are chosen by ``class_path`` (the kit's classes also by their
short names). Technique fragments append callbacks with ``trainer.callbacks+:``. After ``fit``,
the run is validated at its last step (unless a validation just ran), the test split is evaluated
with the final weights unless ``--test_after_fit false``, and a language model prints a sample of
generated text. An argument error prints one line, the kit's message, and exits with status 2.
A ``--ckpt_path`` is read and compared with the config before anything is built.

``lit-eff report ...`` and ``lit-eff sweep ...`` compare runs at equal FLOPs; see
:mod:`lit_eff.report` and :mod:`lit_eff.sweep`. ``lit-eff search ...`` searches a trained supernet
checkpoint for the best subnet under a FLOPs budget (:mod:`lit_eff.supernet.search`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import signal
import sys

from jsonargparse import DefaultHelpFormatter
from lightning.pytorch import Callback, LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

import lit_eff.callbacks  # noqa: F401  (registers short class names)
import lit_eff.datamodules  # noqa: F401
import lit_eff.models  # noqa: F401
import lit_eff.supernet  # noqa: F401
from lit_eff.runs import ResumableCheckpoint
from lit_eff.runs.checkpoint import EXIT_STATUS
from lit_eff.runs.resume import checkpoint_stack, model_mismatch, read_lightning_checkpoint, stack_mismatch, \
    stateful_stack
from lit_eff.runs.summary import ModelSummary

TOOLS = {"report": "lit_eff.report", "sweep": "lit_eff.sweep", "search": "lit_eff.supernet.search"}
SUBCOMMANDS = ("fit", "validate", "test", "predict")
EPILOG = """other tools (each with its own --help):
  report              compare runs at equal training FLOPs: a plot and a Markdown table
                      (lit-eff report lightning_logs --metric val/acc)
  sweep               train a base config alone and with each technique fragment under one
                      FLOPs budget, then report (lit-eff sweep --base B --techniques F ... --budget X)
  search              search a trained supernet checkpoint for the best subnet under a FLOPs
                      budget (lit-eff search --ckpt last.ckpt --budget-mflops N)

Runs write lightning_logs/version_N/ (TensorBoard, config.yaml, checkpoints/last.ckpt). Resume an
interrupted run with the same command plus --ckpt_path lightning_logs/version_N/checkpoints/last.ckpt.
With several jobs on few cores, set OMP_NUM_THREADS (e.g. 1) so they do not slow each other down."""
LIGHTNING_CKPT_WORDS = {"best", "last", "hpc", "registry"}
_NOISE = re.compile(r"^\W*Tip:|^Trainer already configured with model summary callbacks")


class CLIError(ValueError):
    """An argument error, shown as one line without a traceback by :func:`main`."""


class _Help(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help, keeping the line breaks of the description and epilog."""


class _QuietTips(logging.Filter):
    """Drops Lightning's advertising tips (litlogger, litmodels) and its note on the kit's model
    summary from kit runs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _NOISE.match(str(record.getMessage()))


class _ValidationSteps(Callback):
    """Remembers the optimizer step of the last validation during fit."""

    def __init__(self) -> None:
        self.last_step: int | None = None

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.last_step = trainer.global_step


def explain(message: str) -> str:
    """The useful line of a jsonargparse error: of a "Does not validate against any of the Union
    subtypes" list, the first error that is not about the other subtypes, on one line."""
    key = re.match(r'Parser key "([^"]+)":', message)
    items = re.findall(r"^( *)- (.*(?:\n\1  .*)*)", message, flags=re.M)
    noise = ("Expected a <class 'NoneType'>", "Not a valid subclass of", "Problem with given class_path 'lightning.")
    useful = [text for _, text in items if not text.startswith(noise)]
    text = useful[0] if useful else message[key.end():] if key else message
    if "Does not validate against any of the Union subtypes" in text:
        return explain(text)
    text = " ".join(line.strip() for line in text.strip().splitlines())
    if text.startswith("argument subcommand: invalid choice"):
        text += f"; the other tools are {', '.join(TOOLS)} (see lit-eff --help)"
    return f"--{key.group(1)}: {text}" if key and not text.startswith("--") else text


def root_message(error: BaseException) -> str:
    """The message of the first exception in the chain (the kit's, under jsonargparse's)."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    return str(error) or type(error).__name__


class LitEffCLI(LightningCLI):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("seed_everything_default", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        parser_kwargs = kwargs.setdefault("parser_kwargs", {})
        parser_kwargs.update({"prog": "lit-eff", "usage": "lit-eff [-h] [-c CONFIG] {fit,validate,test,predict} ...\n"
                              "       lit-eff {report,sweep,search} [-h] ...", "description": "lit_eff: train with efficiency techniques, "
                              "every run counting its training FLOPs", "epilog": EPILOG,
                              "formatter_class": _Help, "exit_on_error": False})
        for name in SUBCOMMANDS:
            parser_kwargs.setdefault(name, {}).update({"prog": f"lit-eff {name}", "exit_on_error": False})
        for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
            logging.getLogger(name).addFilter(_QuietTips())
        self.validation_steps = _ValidationSteps()
        super().__init__(LightningModule, LightningDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="After fit, evaluate the test split with the final weights")

    # errors before any work ------------------------------------------------------------------
    def parse_arguments(self, parser, args) -> None:
        try:
            super().parse_arguments(parser, args)
        except argparse.ArgumentError as error:
            raise CLIError(explain(str(error))) from None
        self.check_ckpt_path()

    def check_ckpt_path(self) -> None:
        """A ``--ckpt_path`` must be readable and describe the configured model (LightningCLI would
        otherwise build the checkpoint's model and ignore the config's)."""
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else None
        path = config.get("ckpt_path") if config is not None else None
        if not path or path in LIGHTNING_CKPT_WORDS:
            return
        try:
            self.checkpoint = read_lightning_checkpoint(path)
        except ValueError as error:
            raise CLIError(str(error)) from None
        problem = model_mismatch(path, config.get("model"), self.checkpoint.get("hyper_parameters") or {})
        if problem:
            raise CLIError(problem)
        config["ckpt_path"] = os.path.abspath(path)  # config.yaml records where the run resumed from (report)

    def instantiate_classes(self) -> None:
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand, self.config) if subcommand else self.config
        if config.get("trainer", {}).get("enable_model_summary") is not False:
            self.trainer_defaults = {**self.trainer_defaults, "callbacks": [ModelSummary()]}
        callbacks = self.trainer_defaults.get("callbacks", [])
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        self.trainer_defaults = {**self.trainer_defaults, "callbacks": [*callbacks, self.validation_steps]}
        try:
            super().instantiate_classes()
        except Exception as error:  # jsonargparse wraps the kit's own error in its union report
            raise CLIError(root_message(error)) from None

    def after_instantiate_classes(self) -> None:
        checkpoint = getattr(self, "checkpoint", None)
        if checkpoint is not None and self.subcommand == "fit":
            path = self.config[self.subcommand]["ckpt_path"]
            problem = stack_mismatch(path, checkpoint_stack(checkpoint), stateful_stack(self.trainer.callbacks))
            if problem:
                raise CLIError(problem)
        self.checkpoint = None  # the weights are loaded again by the Trainer; free this copy

    # after fit -------------------------------------------------------------------------------
    def after_fit(self) -> None:
        trainer, model, datamodule = self.trainer, self.model, self.datamodule
        received = next((cb.received for cb in trainer.callbacks if isinstance(cb, ResumableCheckpoint)
                         and cb.received is not None), None)
        if trainer.interrupted or received is not None:  # stopped by a signal after its last step
            raise SystemExit(EXIT_STATUS.get(received, 1))
        config = self.config.get(self.subcommand, self.config)
        if self._defines("val_dataloader") and trainer.limit_val_batches != 0 and \
                self.validation_steps.last_step != trainer.global_step:
            trainer.validate(model, datamodule=datamodule, verbose=False)  # every run ends with a val point
        for logger in trainer.loggers:  # `lit-eff report` tells finished runs by this scalar
            logger.log_metrics({"run/finished": 1.0}, step=max(trainer.global_step - 1, 0))
            logger.save()
        if config.get("test_after_fit", True) and self._defines("test_dataloader"):
            trainer.test(model, datamodule=datamodule)
        if hasattr(model, "generate") and trainer.is_global_zero:
            print(f"\nSample from the trained model:\n{model.generate(max_new_tokens=200)}\n")

    def _defines(self, hook: str) -> bool:
        """Whether the datamodule has its own ``hook`` (a split to evaluate)."""
        datamodule = self.datamodule
        return datamodule is not None and getattr(type(datamodule), hook) is not getattr(LightningDataModule, hook)


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in TOOLS:  # argparse tools, not LightningCLI subcommands
        return importlib.import_module(TOOLS[argv[0]]).cli(argv[1:])
    try:
        LitEffCLI(args=args)
    except CLIError as error:
        sub = argv[0] if argv and argv[0] in SUBCOMMANDS else ""
        print(f"lit-eff{' ' + sub if sub else ''}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except SIGTERMException as error:  # Lightning's own, raised with exit status 0
        raise SystemExit(error.code or EXIT_STATUS[signal.SIGTERM]) from None


if __name__ == "__main__":
    main()
