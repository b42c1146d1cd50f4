"""Contract settings of SparseIFT: the transformation plus the RigL masks that keep its FLOPs dense."""

from __future__ import annotations

from dataclasses import dataclass

from lightning.pytorch import Callback, Trainer

from lit_eff import sparsity
from lit_eff.callbacks import DynamicSparsity, FlopsMonitor, SparseIFT
from lit_eff.flops import count_flops
from lit_eff.sparsity.ift import ParallelLinear
from tests.contract.settings import Setting
from tests.helpers import MODELS


@dataclass
class FollowedSetting(Setting):
    """A setting whose companions go *after* the technique in ``trainer.callbacks`` (SparseIFT must
    transform the model before the sparsity callback masks it)."""

    def build(self) -> list[Callback]:
        return [FlopsMonitor(), self.cls(**self.kwargs), *self.companions()]


def _check(trainer: Trainer, technique: SparseIFT) -> None:
    """The MLPs are enlarged, each new Linear is masked at exactly the transformation's sparsity, and
    a step's sparse-effective FLOPs equal a dense model's (executed FLOPs are larger)."""
    module = trainer.lightning_module
    assert len(technique.sparse) == (4 if technique.transform == "wide" else 4 * round(1 / (1 - technique.sparsity)))
    for name, layer in technique.sparse.items():
        mask = sparsity.get_mask(layer)
        assert int(mask.sum()) == round((1 - technique.sparsity) * mask.numel()), name
        assert int((layer.weight != 0).sum()) <= int(mask.sum()), name  # forward uses the masked weight
    mlp = module.model.blocks[0].mlp
    if technique.transform == "wide":
        assert mlp.fc1.out_features == round(mlp.fc1.in_features * 2 / (1 - technique.sparsity))  # mlp_ratio 2 / 4
    else:
        assert isinstance(mlp.fc1, ParallelLinear)
    monitor = next(cb for cb in trainer.callbacks if isinstance(cb, FlopsMonitor))
    batch = next(iter(trainer.datamodule.train_dataloader()))[0]
    family = "vit" if technique.transform == "wide" else "gpt"
    dense = MODELS[family][0]()
    dense_step = count_flops(lambda: dense(batch)).total * trainer.accumulate_grad_batches
    assert abs(monitor.last_step_effective - dense_step) <= 1e-6 * dense_step
    assert monitor.last_step_executed > 1.2 * dense_step  # the enlarged MLPs run dense on the CPU


def _rigl(s: float, every: int) -> list[Callback]:
    return [DynamicSparsity(sparsity=s, method="rigl", update_every=every, drop_fraction=0.5, stop_fraction=1.0,
                            include=["*blocks.*.mlp.*"])]


IFT: dict[str, Setting] = {
    # Sparse Wide at 50% on the ViT: MLP hidden 64 -> 128, RigL updates at steps 2, 4, 6
    "SparseIFT-wide": FollowedSetting(SparseIFT, {"transform": "wide", "sparsity": 0.5}, "vit",
                                      companions=lambda: _rigl(0.5, 2), check=_check),
    # Sparse Parallel at 50% on the GPT: 2 branches per MLP Linear, RigL updates at steps 3, 6
    # (4 branches are tested outside the contract, tests/callbacks/test_sparse_ift.py)
    "SparseIFT-parallel": FollowedSetting(SparseIFT, {"transform": "parallel", "sparsity": 0.5}, "gpt",
                                          companions=lambda: _rigl(0.5, 3), check=_check),
}
