"""Contract settings of the structured techniques (StructuredFFN, StructuredPruning)."""

from __future__ import annotations

import copy

from lightning.pytorch import Trainer

from lit_eff.callbacks import FlopsMonitor, StructuredFFN, StructuredPruning
from lit_eff.flops import count_flops
from lit_eff.structured import LowRankLinear, StructuredLinear, to_plain_linears
from tests.contract.settings import Setting


def _flops_match_the_model(trainer: Trainer) -> None:
    """FlopsMonitor's last step is the FLOPs of the model as it is now (the smaller shapes)."""
    monitor = next(cb for cb in trainer.callbacks if isinstance(cb, FlopsMonitor))
    batch = next(iter(trainer.datamodule.train_dataloader()))
    micro_batch = count_flops(lambda: trainer.lightning_module(batch[0])).total
    assert monitor.last_step_executed == micro_batch * trainer.accumulate_grad_batches


def _check_ffn(trainer: Trainer, technique: StructuredFFN) -> None:
    """Every MLP matrix is structured, the guides are gone after their phase, and the executed
    FLOPs fell below the dense model's."""
    module = trainer.lightning_module
    layers = technique.layers
    assert len(layers) == 4 and all(isinstance(m, StructuredLinear) for m in layers.values())
    assert not technique.guiding and trainer.global_step >= technique.guide_steps
    assert not any(name.endswith("guide") for name, _ in module.named_parameters())
    if technique.structure == "lowrank":
        assert all(isinstance(m, LowRankLinear) and m.u.shape[1] == technique.rank for m in layers.values())
    _flops_match_the_model(trainer)
    monitor = next(cb for cb in trainer.callbacks if isinstance(cb, FlopsMonitor))
    if technique.guide_steps:
        assert monitor.last_step_executed < monitor.total_executed / trainer.global_step  # guided steps cost more
    dense = copy.deepcopy(module.model)
    to_plain_linears(dense)
    batch = next(iter(trainer.datamodule.train_dataloader()))[0]
    assert count_flops(lambda: module.model(batch)).total < count_flops(lambda: dense(batch)).total


def _check_pruning(trainer: Trainer, technique: StructuredPruning) -> None:
    """All removal events ran, the model's tensors have the kept counts, something was removed,
    LAPP's gates are gone, and FlopsMonitor counts the shrunken model."""
    assert technique.applied == technique.events[-1] < trainer.global_step
    assert technique.method == "magnitude" or technique.hardened
    assert not any("prune_gate" in name for name, _ in trainer.lightning_module.named_parameters())
    assert any(g.count < g.dense for g in technique.groups)
    for group in technique.groups:
        first = group.tensors()[0]
        assert getattr(first.module, first.name).shape[first.dim] == group.count * first.per_member * first.blocks
    _flops_match_the_model(trainer)



STRUCTURED: dict[str, Setting] = {
    # low-rank (rank 8 of 32) fc1/fc2 in the ViT, guided for 4 of 8 steps (cosine), then the
    # guides drop (one shape change)
    "StructuredFFN-lowrank": Setting(
        StructuredFFN, {"structure": "lowrank", "rank": 8, "guide_fraction": 0.5}, "vit",
        companions=lambda: [FlopsMonitor()], check=_check_ffn, compile_phases=1,
        fsdp2_refusal=r"StructuredFFN.*drops its dense guides.*ModelParallelStrategy",
        returned=StructuredFFN.plain_state_dict),
    # block-shuffle (4 blocks) in the GPT from the first step, no guide: nothing changes shape
    # mid-run, so FSDP2 shards the structured layers like any other
    "StructuredFFN-blockshuffle": Setting(
        StructuredFFN, {"structure": "blockshuffle", "blocks": 4, "guide_fraction": 0.0}, "gpt",
        companions=lambda: [FlopsMonitor()], check=_check_ffn, returned=StructuredFFN.plain_state_dict),
    # LAPP on the ViT: soft masks and the FLOPs penalty for steps 0-3, members below the threshold
    # removed after steps 1 and 3 (events 2, 4), hardened at step 4
    "StructuredPruning-lapp": Setting(
        StructuredPruning, {"method": "lapp", "flops_target": 0.5, "end": 0.5, "prune_every": 2,
                            "threshold_scale": 300.0}, "vit",
        companions=lambda: [FlopsMonitor()], check=_check_pruning, compile_phases=2,
        fsdp2_refusal=r"StructuredPruning.*changes parameter shapes during training",
        returned=StructuredPruning.plain_state_dict),
    # the magnitude baseline on the GPT: half the pruning at step 2, all of it at step 4
    "StructuredPruning-magnitude": Setting(
        StructuredPruning, {"method": "magnitude", "flops_target": 0.6, "start": 0.25, "end": 0.5,
                            "prune_every": 2}, "gpt",
        companions=lambda: [FlopsMonitor()], check=_check_pruning, compile_phases=2,
        fsdp2_refusal=r"StructuredPruning.*changes parameter shapes during training",
        returned=StructuredPruning.plain_state_dict),
}
