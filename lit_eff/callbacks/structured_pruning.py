"""Structured pruning that shrinks the model during training: LAPP (learned per-layer thresholds
under a FLOPs target) or a Torch-Pruning-style magnitude baseline."""

from __future__ import annotations

import copy
import time
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.nn.utils import parametrize
from typing_extensions import override

from lit_eff import validation
from lit_eff.callbacks._surgery import Carried, rebuild_training, refuse_strategy, restructure_on_load
from lit_eff.callbacks.technique import Technique, log_step
from lit_eff.models.naming import named_modules
from lit_eff.structured import cost as costs
from lit_eff.structured.gates import attach_gates, detach_gates, gate_of, scores, soft_mask
from lit_eff.structured.groups import KINDS, ConvChannels, Group, find_groups
from lit_eff.structured.prune import expand_state_dict, keep_above_half, keep_top, layouts

__all__ = ["StructuredPruning"]

#: LAPP's removals before ``end`` take the members whose soft mask fell below this (their output
#: is nearly gone already); the last one takes every member below 0.5.
OFF = 0.05


class StructuredPruning(Technique):
    """Removes attention heads, MLP hidden units and ResNet block channels during training, so
    the model, its executed FLOPs and its step time shrink (docs/techniques/structured_pruning.md).

    ``method="lapp"``: each group (a layer's heads, units or channels) masks its members with
    ``σ((s − τ)/T)`` (``s`` importance over the group's largest, ``τ`` a learned threshold), and
    ``λ·max(0, FLOPs(m)/FLOPs_dense − flops_target)²`` joins the loss from ``start`` to ``end``
    (fractions of training). Every ``prune_every`` steps before ``end`` the members with mask
    < 0.05 are removed; at ``end`` those < 0.5 too, the other masks fold into the weights and the
    gates go.
    ``method="magnitude"``: at the same steps, every group keeps its members of highest group
    L1/L2 norm, the pruned share growing linearly to the one that meets ``flops_target``.

    After a removal the optimizer and scheduler are re-created at the same step with the kept
    rows of their state; a checkpoint written after it restores into a fresh model.

    Example::

        trainer:
          callbacks+:
            - class_path: lit_eff.callbacks.StructuredPruning
              init_args: {method: lapp, flops_target: 0.5, start: 0.0, end: 0.3, prune_every: 50}
    """

    def __init__(
        self,
        method: Literal["lapp", "magnitude"] = "lapp",
        flops_target: float = 0.5,
        structures: list[Literal["heads", "mlp", "channels"]] | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        start: float = 0.0,
        end: float = 0.3,
        prune_every: int | None = None,
        penalty: float = 10.0,
        temperature: float = 0.05,
        threshold_scale: float = 2.0,
        importance: Literal["auto", "l1", "l2", "bn"] = "auto",
        min_keep: int = 1,
    ) -> None:
        super().__init__()
        validation.check_choice("method", method, ("lapp", "magnitude"))
        validation.check_fraction("flops_target", flops_target, low_open=True, high_open=True)
        if structures is not None:
            if not isinstance(structures, (list, tuple)) or not structures or any(k not in KINDS for k in structures):
                raise ValueError(f"Expected `structures` to be None or a non-empty list from {list(KINDS)}, "
                                 f"got structures={structures!r}")
        validation.check_fraction("start", start, high_open=True)
        validation.check_fraction("end", end, high_open=True)
        if end < start or (method == "lapp" and end == start):
            relation = "<" if method == "lapp" else "<="
            raise ValueError(f"Expected `start` {relation} `end`, got start={start}, end={end}"
                             + (" (LAPP learns its thresholds between them)" if method == "lapp" else ""))
        validation.check_int("prune_every", prune_every, minimum=1, allow_none=True)
        for name, value in (("penalty", penalty), ("temperature", temperature), ("threshold_scale", threshold_scale)):
            validation.check_number(name, value, 0.0, low_open=True)
        validation.check_choice("importance", importance, ("auto", "l1", "l2", "bn"))
        validation.check_int("min_keep", min_keep, minimum=1)
        self.method, self.flops_target, self.structures = method, float(flops_target), structures
        self.include = validation.check_patterns("include", include)
        self.exclude = validation.check_patterns("exclude", exclude)
        self.start, self.end, self.prune_every = float(start), float(end), prune_every
        self.penalty, self.temperature = float(penalty), float(temperature)
        self.threshold_scale = float(threshold_scale)
        self.importance, self.min_keep = importance, min_keep

        self.groups: list[Group] = []
        self.events: list[int] = []  # optimizer steps at which members are removed (the last hardens LAPP)
        self.start_step = self.end_step = 0
        self.cost: costs.CostModel | None = None
        self.ratio: float | None = None  # magnitude: the pruning ratio that meets the target
        self.applied = -1  # the last event applied
        self.hardened = False
        self.last_penalty = 0.0
        self._modes: dict[str, str] = {}
        self._handles: list = []
        self._load_hook = None
        self._names: dict[nn.Module, str] = {}
        self._model_id: int | None = None
        self._step_seen = -1
        self._clock: float | None = None
        self._seconds = 0.0

    # setup ------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._model_id != id(pl_module) or not self.groups:  # a later fit or test of the same model keeps them
            groups = find_groups(pl_module, self.structures, self.include, self.exclude)
            self._modes = {g.name: self._importance_of(g) for g in groups}
            for group in groups:
                if group.dense < self.min_keep:
                    raise ValueError(f"Expected `min_keep` <= the {group.dense} members of {group.name}, "
                                     f"got min_keep={self.min_keep}")
            self.groups, self._model_id = groups, id(pl_module)
            self._names = {m: name + "." if name else "" for name, m in named_modules(pl_module)}
            if stage == "fit" and self.method == "lapp":
                self._handles = attach_gates(groups, self._modes, self.threshold_scale, self.temperature)
        if self._load_hook is None:  # a checkpoint of the pruned model loads (resume, `test --ckpt_path`)
            self._load_hook = restructure_on_load(pl_module, self._take_checkpoint)
        if stage != "fit":
            return
        if len(self.others(trainer, StructuredPruning)):
            raise ValueError("Found more than one StructuredPruning in trainer.callbacks; keep one (give it all "
                             "the structures, or `include` patterns)")
        refuse_strategy(trainer, self.describe(trainer), "removes attention heads, MLP units or channels mid-run")
        total = self.run_length(trainer)
        self.start_step = round(self.start * total)
        self.end_step = max(round(self.end * total), self.start_step + (self.method == "lapp"), 1)
        if self.end_step >= total:
            raise ValueError(f"{self.name}: `end`={self.end} puts the last pruning step at {self.end_step}, but the "
                             f"run has {total} optimizer steps (0..{total - 1}); lower `end`")
        every = self.prune_every or self.end_step + 1
        first = self.start_step + (self.method == "lapp")  # LAPP removes only after learning thresholds
        self.events = sorted({self.end_step, *range(self.end_step, first - 1, -every)})

    def _importance_of(self, group: Group) -> str:
        if self.importance == "bn" and not isinstance(group, ConvChannels):
            raise ValueError(f"Expected `importance` 'bn' only with BatchNorm channels, but {group.name} "
                             f"({group.kind}) has none: use 'auto', 'l1' or 'l2'")
        if self.importance != "auto":
            return self.importance
        if self.method == "lapp":
            return "bn" if isinstance(group, ConvChannels) else "l1"
        return "l2"

    def _take_checkpoint(self, state_dict: dict[str, Any], names: dict[nn.Module, str]) -> None:
        """Before weights load: take the checkpoint's member counts, and its gates or their absence."""
        for group in self.groups:
            first = group.tensors()[0]
            key = names[first.module] + first.name
            if key in state_dict:
                count = state_dict[key].shape[first.dim] // (first.per_member * first.blocks)
                if count != group.count:
                    group.keep(torch.arange(count))  # placeholder values; the load overwrites them
        gated = any(names[g.owner] + g.gate_name + ".theta" in state_dict for g in self.groups)
        if self._handles and not gated:
            detach_gates(self.groups, self._handles)
            self.hardened = True
        elif gated and not self._handles and self.method == "lapp":
            self._handles = attach_gates(self.groups, self._modes, self.threshold_scale, self.temperature)
            self.hardened = False

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for group in self.groups:
            touched = [m for m in (getattr(group, a, None) for a in ("fc1", "fc2", "qkv", "proj", "conv", "next_conv"))
                       if m is not None]
            if any(parametrize.is_parametrized(m) for m in touched):
                raise ValueError(f"{self.describe(trainer)} removes rows and columns of {group.name}'s weights, "
                                 f"which another callback masks (a parametrization): exclude those layers from one "
                                 f"of them")
            attached = {id(m) for _, m in named_modules(pl_module)}
            if any(id(m) not in attached for m in touched):
                raise ValueError(f"{self.describe(trainer)}: {group.name}'s layers were replaced by another "
                                 f"callback (StructuredFFN?) after it found them; exclude them from one of the two")

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.mark_step(trainer.global_step)
        self._step_seen = -1
        self._clock = None

    # FLOPs accounting -------------------------------------------------------------------------
    @override
    def flops_key(self, trainer: Trainer) -> int:
        return sum(1 for event in self.events if event <= trainer.global_step)

    # the schedule -----------------------------------------------------------------------------
    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._step_seen:
            return  # a later micro-batch of the same optimizer step
        self._step_seen = step
        if self.cost is None:
            example = _example(batch)
            if example is None:
                raise ValueError(f"{self.name} needs a tensor in the training batch to count the model's FLOPs")
            self.cost = costs.probe(pl_module, example, self.groups)
        due = [e for e in self.events if self.applied < e <= step]
        if due:
            self._prune(trainer, due[-1])

    def fractions(self, soft: bool = False) -> list[Any]:
        """Kept fraction of every group (soft counts ``Σ m / dense`` in LAPP's soft phase)."""
        if soft and not self.hardened and self.method == "lapp":
            return [soft_mask(g, self._modes[g.name], torch.float64).sum() / g.dense for g in self.groups]
        return [g.count / g.dense for g in self.groups]

    def _prune(self, trainer: Trainer, event: int) -> None:
        carried: Carried = {}
        changed = False
        if self.method == "lapp":
            final = event >= self.end_step
            with torch.no_grad():
                masks = [soft_mask(g, self._modes[g.name]).float() for g in self.groups]
            for group, mask in zip(self.groups, masks):
                # before the end only members whose mask is nearly 0 go; at the end all below 0.5
                index = keep_above_half(mask if final else mask + 0.5 - OFF, self.min_keep)
                if final:
                    group.scale(mask)  # the kept members' masks fold into the weights
                if index.numel() < group.count:
                    carried.update(group.keep(index))
                    changed = True
            if final:
                detach_gates(self.groups, self._handles)
                self.hardened = changed = True
        else:
            if self.ratio is None:
                self.ratio = costs.uniform_ratio(self.cost, self.flops_target, self.groups, self.min_keep)
            done = sum(1 for e in self.events if e <= event)
            share = self.ratio * done / len(self.events)
            for group in self.groups:
                count = max(self.min_keep, round(group.dense * (1 - share)))
                if count < group.count:
                    carried.update(group.keep(keep_top(scores(group, self._modes[group.name]), count)))
                    changed = True
        self.applied = event
        if changed:
            rebuild_training(trainer, carried)

    # the FLOPs penalty ------------------------------------------------------------------------
    def penalty_active(self, step: int) -> bool:
        return self.method == "lapp" and not self.hardened and self.start_step <= step < self.end_step

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        """Add ``∂/∂θ [λ·max(0, FLOPs(m)/FLOPs_dense − target)²]`` to the thresholds' gradients:
        once per optimizer step, after DDP averaged and AMP unscaled them, before clipping."""
        self.last_penalty = 0.0
        if not self.penalty_active(trainer.global_step) or self.cost is None:
            return
        gates = [gate_of(g) for g in self.groups]
        with torch.enable_grad(), torch.autocast(trainer.strategy.root_device.type, enabled=False):
            excess = torch.relu(self.cost.ratio(self.fractions(soft=True)) - self.flops_target)
            loss = self.penalty * excess ** 2
            self.last_penalty = float(loss.detach())
            if not loss.requires_grad:
                return
            grads = torch.autograd.grad(loss, [gate.theta for gate in gates])
        for gate, grad in zip(gates, grads):
            gate.theta.grad = grad if gate.theta.grad is None else gate.theta.grad + grad

    # logging ----------------------------------------------------------------------------------
    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.optimizer_stepped(trainer):
            return
        now = time.perf_counter()
        self._seconds, self._clock = (now - self._clock if self._clock is not None else 0.0), now
        log_step(trainer, pl_module, self._metrics)

    def _metrics(self) -> dict[str, float]:
        with torch.no_grad():
            metrics = {"pruning/flops_ratio": float(self.cost.ratio(self.fractions())) if self.cost else 1.0,
                       "pruning/kept_fraction": sum(g.count for g in self.groups) / sum(g.dense for g in self.groups)}
            if self.method == "lapp" and not self.hardened and self.cost is not None:
                metrics["pruning/flops_ratio_soft"] = float(self.cost.ratio(self.fractions(soft=True)))
                metrics["pruning/threshold_mean"] = sum(float(gate_of(g).threshold()) for g in self.groups) / len(
                    self.groups)
                metrics["pruning/penalty"] = self.last_penalty
        if self._seconds:
            metrics["pruning/step_seconds"] = self._seconds
        return metrics

    # end of fit -------------------------------------------------------------------------------
    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None
        if stage == "fit" and self.in_worker_process():
            self.restore_dense(pl_module)

    def restore_dense(self, pl_module: nn.Module) -> None:
        """Give ``pl_module`` its constructor's structure back, computing the same function: masks
        folded into the weights, gates removed, removed members re-expanded as zeros. (After a
        ``ddp_spawn`` fit the main process loads this model's weights into its own, which never
        saw this callback.)"""
        if self._handles:
            with torch.no_grad():
                for group in self.groups:
                    group.scale(soft_mask(group, self._modes[group.name]).float())
            detach_gates(self.groups, self._handles)
        for group in self.groups:
            group.expand()

    def export(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` (the LightningModule or its inner model) once the masks hardened: a
        plain module of the model's own classes with smaller layers, no gates and no hooks, that
        computes what the trained one does."""
        if self._handles:
            raise ValueError(f"{self.name}.export was called before its masks hardened (at step {self.end_step}); "
                             f"train past `end`, or resume the run with the callback")
        return copy.deepcopy(model)

    # state ------------------------------------------------------------------------------------
    @override
    def technique_state(self) -> dict[str, Any]:
        return {"applied": self.applied, "hardened": self.hardened, "ratio": self.ratio,
                "cost": None if self.cost is None else self.cost.state(),
                "groups": layouts(self.groups, self._names) if self.groups else []}

    @override
    def load_technique_state(self, state: dict[str, Any]) -> None:
        self.applied = int(state.get("applied", -1))
        self.hardened = bool(state.get("hardened", False))
        self.ratio = state.get("ratio")
        self.cost = None if state.get("cost") is None else costs.CostModel.from_state(state["cost"])
        for group, layout in zip(self.groups, state.get("groups", [])):
            kept = torch.tensor(layout["kept"], dtype=torch.long)
            if kept.numel() != group.count:
                raise ValueError(f"{self.name}: the checkpoint keeps {kept.numel()} members of {group.name}, "
                                 f"but the model has {group.count}")
            group.kept = kept

    @staticmethod
    def plain_state_dict(checkpoint: dict[str, Any], state_key: str = "StructuredPruning") -> dict[str, torch.Tensor]:
        """The state dict of a checkpoint written after the masks hardened, in the shapes of the
        model the run started from (removed members as zeros): it loads into that plain model and
        computes what the pruned one does."""
        state = checkpoint["callbacks"][state_key]
        if _has_gates(checkpoint["state_dict"]):
            raise ValueError("This checkpoint was written before StructuredPruning hardened its masks: resume it "
                             "with the callback, or export the model after the run")
        return expand_state_dict(checkpoint["state_dict"], state["groups"])


def _example(batch: Any) -> torch.Tensor | None:
    """The first tensor of a batch (the model's input in the kit's modules)."""
    if isinstance(batch, torch.Tensor):
        return batch
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else []
    return next((found for item in items if (found := _example(item)) is not None), None)


def _has_gates(state_dict: dict[str, torch.Tensor]) -> bool:
    return any(".prune_gate" in key for key in state_dict)
