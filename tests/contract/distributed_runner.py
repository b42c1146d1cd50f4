"""Runs contract settings in two CPU processes under DDP and under FSDP2 and saves what each rank
ends with, for tests/contract/test_contract.py::test_fsdp2_equals_ddp.

    python -m tests.contract.distributed_runner OUT_DIR [SETTING_ID ...]

Lightning's ``ModelParallelStrategy`` (FSDP2) launches its second process by running this
script again, as it does for any user script; both processes then go through every setting,
first with ``DDPStrategy``, then with ``ModelParallelStrategy``. For each (setting, strategy)
rank ``r`` writes ``OUT_DIR/<setting>/<strategy>/rank<r>.pt`` (full weights, technique states),
or ``error.txt`` with the message of the exception that stopped the run.
"""

from __future__ import annotations

import os
import sys
import traceback

import torch
from lightning.pytorch import Callback
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

from lit_eff.models.naming import clean_name
from tests.contract.settings import SETTINGS
from tests.helpers import MODELS, make_trainer, seeded


def full_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict with sharded (DTensor) entries gathered into full tensors."""
    state = {}
    for key, value in module.state_dict().items():
        if hasattr(value, "full_tensor"):
            value = value.full_tensor()
        state[clean_name(key)] = value.detach().cpu().clone()
    return state


class RankRecorder(Callback):
    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_fit_end(self, trainer, pl_module) -> None:
        weights = full_state(pl_module)  # a collective under FSDP2: every rank takes part
        techniques = {type(cb).__name__: cb.state_dict() for cb in trainer.callbacks
                      if type(cb).__module__.startswith("lit_eff")}
        torch.save({"weights": weights, "techniques": techniques, "step": trainer.global_step},
                   os.path.join(self.folder, f"rank{trainer.global_rank}.pt"))


def run(sid: str, strategy_name: str, out: str) -> None:
    setting = SETTINGS[sid]
    folder = os.path.join(out, sid, strategy_name)
    os.makedirs(folder, exist_ok=True)
    strategy = DDPStrategy(find_unused_parameters=setting.find_unused_parameters) if strategy_name == "ddp" \
        else ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    seeded(0)
    make_model, make_data = MODELS[setting.model]
    trainer = make_trainer(strategy=strategy, devices=2, max_steps=setting.steps,
                           callbacks=[*setting.build(), RankRecorder(folder)])
    try:
        trainer.fit(make_model(), datamodule=make_data())
    except Exception as error:  # a refusal (the test checks its message) or a failure
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            with open(os.path.join(folder, "error.txt"), "w") as file:
                file.write(f"{type(error).__name__}: {error}\n\n{traceback.format_exc()}")


def main() -> None:
    out, sids = sys.argv[1], sys.argv[2:] or sorted(SETTINGS)
    for sid in sids:
        for strategy_name in ("ddp", "fsdp2"):
            run(sid, strategy_name, out)


if __name__ == "__main__":
    main()
