"""Structured feed-forward layers with self-guided training (Wei et al., 2024)."""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Iterator
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.nn.utils import parametrize
from typing_extensions import override

from lit_eff import validation
from lit_eff.callbacks._surgery import rebuild_training, refuse_strategy, restructure_on_load
from lit_eff.callbacks.technique import Technique, log_step
from lit_eff.seeding import generator, run_seed
from lit_eff.structured.ffn import STRUCTURES, find_linears, guide_alpha, structure_linears, to_plain_linears
from lit_eff.structured.linear import (BlockDenseLinear, BlockShuffleLinear, LowRankLinear, StructuredLinear,
                                       to_linear)

__all__ = ["StructuredFFN"]


class StructuredFFN(Technique):
    """Replaces the MLP matrices (``fc1``/``fc2`` of every block by default) by low-rank or
    block-diagonal ones, so every step computes fewer FLOPs (docs/techniques/structured_ffn.md).

    ``structure``: ``"lowrank"`` (``rank``), ``"blockshuffle"`` (two block-diagonal factors with a
    shuffle, ``blocks``) or ``"blockdense"`` (a block-diagonal factor then a dense one, ``rank``
    and ``blocks``). ``rank`` is an int, or a float in (0, 1) for that fraction of ``min(in,
    out)``. Self-guided training: for the first ``guide_fraction`` of training each layer also
    runs a dense weight ``G`` and outputs ``α·xGᵀ + (1 − α)·S(x) + b``, ``α`` decaying from 1 to
    0 (``guide_schedule``); then ``G`` is removed with its FLOPs and the optimizer is re-created.

    Example::

        trainer:
          callbacks+:
            - class_path: lit_eff.callbacks.StructuredFFN
              init_args: {structure: lowrank, rank: 0.25, guide_fraction: 0.5}
    """

    def __init__(
        self,
        structure: Literal["lowrank", "blockshuffle", "blockdense"] = "lowrank",
        rank: int | float | None = None,
        blocks: int | None = None,
        guide_fraction: float = 0.5,
        guide_schedule: Literal["cosine", "linear"] = "cosine",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
    ) -> None:
        super().__init__()
        validation.check_choice("structure", structure, STRUCTURES)
        uses_rank, uses_blocks = structure in ("lowrank", "blockdense"), structure in ("blockshuffle", "blockdense")
        if isinstance(rank, float) and rank >= 1 and rank.is_integer():
            rank = int(rank)  # YAML/jsonargparse may hand an int rank over as a float
        if uses_rank:
            if isinstance(rank, float):
                validation.check_fraction("rank", rank, low_open=True, high_open=True)
            else:
                validation.check_int("rank", rank, minimum=1)
        elif rank is not None:
            raise ValueError(f"Expected no `rank` for structure={structure!r} (it uses `blocks`), got rank={rank!r}")
        if uses_blocks:
            validation.check_int("blocks", blocks, minimum=2)
        elif blocks is not None:
            raise ValueError(f"Expected no `blocks` for structure={structure!r} (it uses `rank`), "
                             f"got blocks={blocks!r}")
        validation.check_fraction("guide_fraction", guide_fraction, high_open=True)
        validation.check_choice("guide_schedule", guide_schedule, ("cosine", "linear"))
        self.structure, self.rank, self.blocks = structure, rank, blocks
        self.guide_fraction, self.guide_schedule = float(guide_fraction), guide_schedule
        self.include = validation.check_patterns("include", include)
        self.exclude = validation.check_patterns("exclude", exclude)
        self.layers: dict[str, StructuredLinear] = {}
        self.guide_steps = 0
        self._replaced: list[nn.Module] = []
        self._load_hook = None

    @property
    def guiding(self) -> bool:
        return any(layer.guided for layer in self.layers.values())

    # setup ------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not self.layers:
            if stage == "fit":
                self.guide_steps = round(self.guide_fraction * self.run_length(trainer))
                if self.guide_steps:
                    refuse_strategy(trainer, self.describe(trainer), f"drops its dense guides after "
                                    f"{self.guide_steps} steps (guide_fraction={self.guide_fraction})")
            targets = find_linears(pl_module, self.include, self.exclude)
            for name, linear in targets.items():
                if parametrize.is_parametrized(linear):
                    owners = [cb.__class__.__name__ for cb in trainer.callbacks
                              if linear in getattr(cb, "targets", {}).values()] or ["another callback"]
                    raise ValueError(f"{self.describe(trainer)} replaces {name}, whose weight {owners[0]} masks "
                                     f"(a parametrization): exclude it from one of them")
            self._replaced = list(targets.values())
            self.layers = structure_linears(pl_module, targets, self.structure, self.rank, self.blocks,
                                            guided=self.guide_steps > 0,
                                            generator_for=lambda name: generator(run_seed(), "structured-ffn", name))
        if self._load_hook is None:  # a checkpoint of the structured model loads (resume, `test --ckpt_path`)
            self._load_hook = restructure_on_load(pl_module, self._take_checkpoint)

    def _take_checkpoint(self, state_dict: dict[str, Any], names: dict[nn.Module, str]) -> None:
        """Before weights load: add or drop each layer's guide as the checkpoint has it."""
        for layer in self.layers.values():
            guided = names[layer] + "guide" in state_dict
            if layer.guided and not guided:
                layer.drop_guide()
            elif guided and not layer.guided:
                layer.add_guide()  # placeholder values; the load overwrites them

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        replaced = {id(m) for m in self._replaced}
        for cb in trainer.callbacks:
            targets = getattr(cb, "targets", None)
            if cb is not self and isinstance(targets, dict) and any(id(m) in replaced for m in targets.values()):
                raise ValueError(f"{cb.__class__.__name__} targets layers that {self.describe(trainer)} replaced by "
                                 f"structured ones: exclude the MLP layers from one of them")

    # FLOPs accounting -------------------------------------------------------------------------
    @override
    def flops_key(self, trainer: Trainer) -> bool:
        return trainer.global_step < self.guide_steps  # the guides run (and cost FLOPs) until then

    plans_flops = True

    @override
    def plan_state(self, trainer: Trainer, step: int, total: int) -> bool:
        return self.guiding and step < round(self.guide_fraction * total)

    @override
    @contextlib.contextmanager
    def plan_probe(self, trainer: Trainer, pl_module: LightningModule, state: Hashable, batch: Any) -> Iterator[None]:
        guides = {} if state else {layer: layer.guide for layer in self.layers.values() if layer.guided}
        for layer in guides:
            layer.guide = None  # counted as after the guides are dropped
        try:
            yield
        finally:
            for layer, guide in guides.items():
                layer.guide = guide

    @override
    def replan(self, trainer: Trainer) -> None:
        if self.guide_steps:
            self.guide_steps = max(1, round(self.guide_fraction * self.run_length(trainer)))

    # self-guided training ---------------------------------------------------------------------
    def alpha(self, step: int) -> float:
        return guide_alpha(step, self.guide_steps, self.guide_schedule)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if not self.guiding:
            return
        step = trainer.global_step
        if step >= self.guide_steps:
            for layer in self.layers.values():
                layer.drop_guide()
            rebuild_training(trainer, {})
            return
        alpha = self.alpha(step)
        for layer in self.layers.values():
            layer.alpha.fill_(alpha)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.optimizer_stepped(trainer) and self.guide_steps:
            log_step(trainer, pl_module, {"structured_ffn/alpha": self.alpha(trainer.global_step - 1)})

    # end of fit -------------------------------------------------------------------------------
    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None
        if stage == "fit" and self.in_worker_process():
            # after ddp_spawn the main process loads this model's weights into its own plain one
            to_plain_linears(pl_module)

    # state ------------------------------------------------------------------------------------
    @override
    def technique_state(self) -> dict[str, Any]:
        return {"guide_steps": self.guide_steps,
                "layers": {name: _describe(layer) for name, layer in self.layers.items()}}

    @staticmethod
    def plain_state_dict(checkpoint: dict[str, Any], state_key: str = "StructuredFFN") -> dict[str, torch.Tensor]:
        """The state dict of a checkpoint written with this callback, with every structured layer
        turned into the plain ``nn.Linear`` weight it computes (guides mixed in): it loads into
        the model the run started from."""
        state = dict(checkpoint["state_dict"])
        for name, spec in checkpoint["callbacks"][state_key]["layers"].items():
            prefix = name + "."
            own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            layer = _build(spec)
            if "guide" in own:
                layer.add_guide()
            layer.load_state_dict(own)
            plain = to_linear(layer.to(next(iter(own.values())).dtype))
            for key in own:
                del state[prefix + key]
            state.update({prefix + k: v for k, v in plain.state_dict().items()})
        return state


def _describe(layer: StructuredLinear) -> dict[str, Any]:
    return {"class": type(layer).__name__, "in": layer.in_features, "out": layer.out_features,
            "bias": layer.bias is not None, "rank": getattr(layer, "rank", None),
            "blocks": getattr(layer, "blocks", None)}


def _build(spec: dict[str, Any]) -> StructuredLinear:
    args = (spec["in"], spec["out"])
    if spec["class"] == "LowRankLinear":
        return LowRankLinear(*args, spec["rank"], spec["bias"])
    if spec["class"] == "BlockShuffleLinear":
        return BlockShuffleLinear(*args, spec["blocks"], spec["bias"])
    return BlockDenseLinear(*args, spec["rank"], spec["blocks"], spec["bias"])
