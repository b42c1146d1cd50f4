"""Per-step technique values reach the loggers on exactly the steps Lightning writes."""

from __future__ import annotations

from lightning.pytorch.loggers import Logger

from lit_eff.callbacks import NMSparsity
from tests.helpers import MODELS, make_trainer, seeded


class Recorder(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, set[str]]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.records.append((step, set(metrics)))


def test_technique_values_are_logged_with_the_model_loss_and_only_then():
    seeded(0)
    make_model, make_data = MODELS["vit"]
    recorder = Recorder()
    trainer = make_trainer(max_steps=7, log_every_n_steps=3, logger=recorder, limit_val_batches=0,
                           callbacks=[NMSparsity(n=2, m=4)])
    module = make_model()
    calls: list[int] = []  # global_step of every pl_module.log call for a technique value
    original = module.log

    def counting_log(name, *args, **kwargs):
        if name.startswith("sparsity/"):
            calls.append(trainer.global_step)
        return original(name, *args, **kwargs)

    module.log = counting_log
    trainer.fit(module, datamodule=make_data())
    loss_steps = {step for step, keys in recorder.records if "train/loss" in keys}
    beta_steps = {step for step, keys in recorder.records if "sparsity/beta" in keys}
    assert loss_steps == {2, 5}  # Lightning writes after optimizer steps 3 and 6
    assert beta_steps == loss_steps
    # pl_module.log (about a millisecond a call) runs only on those steps and the last one,
    # so callback_metrics end with the final values
    assert sorted(set(calls)) == [3, 6, 7] and len(calls) == 3 * 4
    assert float(trainer.callback_metrics["sparsity/density"]) == 0.5
