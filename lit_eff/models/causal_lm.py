"""Next-token language modelling with the kit's GPT."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torchmetrics import MeanMetric

from lit_eff.models.gpt import GPT
from lit_eff.models.kv_cache import KVCache
from lit_eff.models.naming import compile_agnostic_state_dict
from lit_eff.models.sharding import shard_model
from lit_eff.models.optim import adamw_warmup_cosine, check_optim_args
from lit_eff.models.weights import load_weights
from lit_eff.tokens.recursion import Recursion
from lit_eff.tokens.skip import restore_routers
from lit_eff.sparsity.ift import restore_structure
from lit_eff.runs.resume import check_resume_state, load_or_explain
from lit_eff.validation import stepping_batches

class CausalLM(LightningModule):
    """Trains :class:`~lit_eff.models.GPT` on (tokens, next tokens) batches.

    Logs ``train/loss``, ``val/loss``, ``val/bpb`` (bits per token: bits per byte for the byte
    vocabulary), ``val/ppl`` and the same for test. :meth:`generate` samples text.

    ``init_weights``: weights to start from (fine-tuning): a Lightning ``.ckpt`` of another run, a
    ``torch.save`` state dict (e.g. a timm model's) or a ``.safetensors`` file; key prefixes are
    matched, lit_eff masks hardened (a sparse run's pruned weights start at exactly 0).
    ``init_weights_skip``: globs of keys left at their initial values, e.g. ``["model.head.*"]``
    for a new head; without it every tensor must fit (:mod:`lit_eff.models.weights`).

    ``activation_checkpointing``: recompute each block's activations in backward instead of
    storing them (``set_grad_checkpointing``). Under Lightning's ``ModelParallelStrategy`` the
    model is sharded with FSDP2, one unit per block (:mod:`lit_eff.models.sharding`).

    ``recursion``: Mixture-of-Recursions (:class:`~lit_eff.tokens.recursion.Recursion`,
    docs/techniques/mixture_of_recursions.md); logs ``mor/router_loss`` and
    ``mor/processed/step{r}`` (share of the tokens each recursion step processed).

    Example::

        model:
          class_path: lit_eff.models.CausalLM
          init_args: {block_size: 256, n_layer: 4, n_head: 4, n_embd: 128, lr: 3.0e-3}
    """

    def __init__(
        self,
        vocab_size: int = 256,
        block_size: int = 256,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        bias: bool = True,
        lr: float = 3e-3,
        weight_decay: float = 0.1,
        warmup: float = 0.05,
        min_lr_factor: float = 0.1,
        init_weights: str | None = None,
        init_weights_skip: list[str] | None = None,
        activation_checkpointing: bool = False,
        recursion: Recursion | None = None,
    ) -> None:
        super().__init__()
        check_optim_args(lr, weight_decay, warmup)
        compile_agnostic_state_dict(self)  # the same checkpoint keys with a compiled `self.model`
        self.register_load_state_dict_pre_hook(restore_routers)  # Mixture-of-Depths routers in a state dict
        self.register_load_state_dict_pre_hook(restore_structure)  # Sparse-IFT's wider / parallel layers
        if isinstance(recursion, dict):  # a checkpoint's hyper-parameters
            recursion = Recursion(**recursion)
        if recursion is not None:  # stored as plain values: checkpoints load with weights_only=True
            recursion = dataclasses.asdict(recursion)
        # a loaded checkpoint already holds the weights
        self.save_hyperparameters(ignore=["init_weights", "init_weights_skip"])
        recursion = None if recursion is None else Recursion(**recursion)
        self.model = GPT(vocab_size, block_size, n_layer, n_head, n_embd, mlp_ratio, dropout, bias, recursion)
        self.model.set_grad_checkpointing(activation_checkpointing)
        if recursion is not None and recursion.dynamic:  # only then: a static model's steps can be planned
            self.flops_key = self._data_dependent_flops
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        if init_weights is not None:
            load_weights(self, init_weights, skip=init_weights_skip)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def loss(self, batch) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(batch[0]))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """Mixture-of-Recursions statistics of the step's last forward, logged outside the
        (possibly compiled) training step: each new metric name would compile Lightning's ``log`` again."""
        stats, recursion = self.model.mor_stats, self.model.recursion
        if recursion is not None and stats.processed is not None:
            values = {f"mor/processed/step{r}": share for r, share in enumerate(stats.processed)}
            if recursion.routed:
                values["mor/router_loss"] = stats.aux_loss
            self.log_dict(values, batch_size=len(batch[0]))

    def _data_dependent_flops(self):
        """``flops_key`` of token-choice recursion, whose shapes depend on the data: FlopsMonitor
        counts every step by tracing, and FlopsBudget cannot plan the run ahead."""
        from lit_eff.callbacks.flops_monitor import DYNAMIC

        return DYNAMIC

    def _eval_step(self, batch, metric: MeanMetric, stage: str) -> None:
        metric.update(self.loss(batch), weight=batch[1].numel())
        self.log(f"{stage}/loss", metric, prog_bar=True)

    def _eval_epoch_end(self, metric: MeanMetric, stage: str) -> None:
        loss = metric.compute()
        self.log(f"{stage}/bpb", loss / math.log(2), prog_bar=stage == "val")
        self.log(f"{stage}/ppl", torch.exp(loss))

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_loss, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end(self.val_loss, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.test_loss, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end(self.test_loss, "test")

    def setup(self, stage: str) -> None:
        """The data's sequences and tokens must fit the model (checked before the model summary): a
        ``block_size`` up to the model's, a vocabulary no larger than the model's."""
        data, model = self.trainer.datamodule, self.model
        recursion = model.recursion
        if recursion is not None and recursion.routed and str(self.trainer.precision) == "16-mixed":
            raise ValueError(f"CausalLM(recursion=...) with routing={recursion.routing!r} cannot run under "
                             "precision='16-mixed': the gradient scaler would not scale the router losses; use "
                             "'bf16-mixed' or 32-bit")
        model.mor_stats.aux_scale = 1.0 / max(1, self.trainer.accumulate_grad_batches)
        block, vocab = getattr(data, "block_size", None), getattr(data, "vocab_size", None)
        if isinstance(block, int) and block > model.block_size:
            raise ValueError(f"{type(data).__name__} cuts sequences of `block_size`={block} tokens, longer than the "
                             f"model's `block_size`={model.block_size} (its positions); set --data.init_args.block_size "
                             f"{model.block_size} or --model.init_args.block_size {block}")
        if isinstance(vocab, int) and vocab > model.vocab_size:
            raise ValueError(f"{type(data).__name__} has a vocabulary of {vocab} tokens, more than the model's "
                             f"`vocab_size`={model.vocab_size}; set --model.init_args.vocab_size {vocab}")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_resume_state(self, checkpoint)  # another technique stack: say so, not lists of keys

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return load_or_explain(self, super().load_state_dict, state_dict, strict, assign)

    def configure_model(self) -> None:
        shard_model(self, self.model)  # FSDP2 under ModelParallelStrategy; nothing otherwise

    def configure_optimizers(self):
        h = self.hparams
        return adamw_warmup_cosine(self.model, stepping_batches(self.trainer), h.lr, h.weight_decay,
                                   h.warmup, betas=(0.9, 0.95), min_lr_factor=h.min_lr_factor)

    @torch.no_grad()
    def generate(self, prompt: str = "", max_new_tokens: int = 200, temperature: float = 0.8,
                 top_k: int | None = 50, seed: int = 0, use_cache: bool = True) -> str:
        """Sample a continuation of ``prompt`` (UTF-8 bytes) and return it decoded. ``use_cache``:
        keep keys and values between tokens while the text fits ``block_size`` (where the model
        allows it, :meth:`GPT.can_cache`); otherwise every step recomputes the window."""
        if max_new_tokens < 0:
            raise ValueError(f"Expected `max_new_tokens` >= 0, got max_new_tokens={max_new_tokens}")
        if temperature <= 0:
            raise ValueError(f"Expected `temperature` > 0, got temperature={temperature}")
        was_training = self.training
        self.eval()
        gen = torch.Generator(device=self.device).manual_seed(seed)
        start = list(prompt.encode("utf-8")) or [ord("\n")]
        idx = torch.tensor([start], dtype=torch.long, device=self.device)
        model = getattr(self.model, "_orig_mod", self.model)  # a cache is Python state: run eagerly
        cache = KVCache() if use_cache and model.can_cache() and idx.shape[1] <= model.block_size else None
        for step in range(max_new_tokens):
            if cache is not None and idx.shape[1] > model.block_size:
                cache = None  # the window moves: positions change, recompute from here on
            if cache is None:
                logits = self.model(idx[:, -model.block_size :])
            else:
                logits = model(idx if step == 0 else idx[:, -1:], cache)
            logits = logits[:, -1, :].float() / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen)
            idx = torch.cat([idx, nxt], dim=1)
        self.train(was_training)
        return bytes(idx[0, len(start) if prompt else 1 :].tolist()).decode("utf-8", errors="replace")
