"""SupernetModule through the shared contract (fit, resume == uninterrupted with sampler state and
banks, DDP with identical subnets on both ranks, accumulation, bf16, YAML), plus search and export."""

import math
import os

import pytest
import torch
import yaml
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from lit_eff.callbacks import FlopsMonitor
from lit_eff.callbacks.masking import MaskingTechnique
from lit_eff.cli import LitEffCLI
from lit_eff.supernet import ComplexityAware, DelayedShrinking, PerformanceAware, Sandwich, SupernetModule, Uniform
from tests.contract.settings import SETTINGS
from tests.contract.test_contract import assert_same_state
from tests.helpers import digits, flat_state, make_trainer, max_abs_diff, seeded, text
from tests.supernet.common import tiny_supernet

SAMPLERS = {
    "sandwich": lambda: Sandwich(k=1),
    "perf": lambda: PerformanceAware(num_buckets=2, k=2, q=0.5, capacity=2),
    "complexity": lambda: ComplexityAware(num_buckets=3, k=1),
    "deps": lambda: DelayedShrinking(start_fraction=0.5, warmup_fraction=0.25, k=1),  # reorganizes at step 4
}


class DrawRecorder(Callback):
    """The subnets each optimizer step trained, per rank, written at the end of fit."""

    def __init__(self, folder=None):
        self.folder, self.steps = folder, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append([str(d.config) for d in pl_module.sampler._cached[1]])  # this batch's draws

    def on_fit_end(self, trainer, pl_module):
        if self.folder:
            torch.save({"steps": self.steps, "weights": flat_state(pl_module), "allreduces": ALLREDUCES[0],
                        "sampler": pl_module.sampler.state_dict()},
                       os.path.join(self.folder, f"rank{trainer.global_rank}.pt"))


def fit(arch="vit", sampler="sandwich", ckpt_dir=None, ckpt_path=None, **kwargs):
    seeded(0)
    module = tiny_supernet(arch, sampler=SAMPLERS[sampler]())
    callbacks = [DrawRecorder(), FlopsMonitor()]  # FlopsMonitor reads flops_key(): the step's subnets, ahead
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=3, save_top_k=-1, filename="{step}"))
    kwargs.setdefault("max_steps", 8)
    trainer = make_trainer(callbacks=callbacks, enable_checkpointing=ckpt_dir is not None, **kwargs)
    trainer.fit(module, datamodule=digits() if arch == "vit" else text())
    return trainer, module, callbacks[0]


@pytest.mark.parametrize("arch, variant", [("vit", {}), ("gpt", {"precision": "bf16-mixed"}),
                                           ("vit", {"precision": "bf16-mixed", "accumulate_grad_batches": 2})])
def test_short_fit(arch, variant):
    trainer, module, recorder = fit(arch, **variant)
    assert trainer.global_step == 8
    assert all(torch.isfinite(p).all() for p in module.parameters())
    metrics = trainer.callback_metrics
    name = "acc" if arch == "vit" else "loss"
    logged = [k for k in metrics if k.startswith(f"supernet/val_{name}@")]
    assert len(logged) == len(module.val_configs) == 3
    assert f"supernet/val_{name}@{module.subnet_flops(module.space.min()) / 1e6:.3g}" in logged
    smallest = metrics[f"supernet/val_{name}@{module.subnet_flops(module.space.min()) / 1e6:.3g}"]
    assert metrics[f"val/{name}_min"] == pytest.approx(float(smallest))
    if arch == "gpt":  # bits per byte of the largest and the smallest subnet
        assert metrics["val/bpb_min"] == pytest.approx(float(smallest) / math.log(2))
        assert metrics["val/bpb"] == pytest.approx(float(metrics["val/loss"]) / math.log(2))
    accumulate = variant.get("accumulate_grad_batches", 1)
    assert len(recorder.steps) == 8 * accumulate
    assert recorder.steps[0] == recorder.steps[accumulate - 1]  # one subnet set per optimizer step
    assert recorder.steps[0][0] == str(module.space.max()) and recorder.steps[0][1] == str(module.space.min())


@pytest.mark.parametrize("sampler", ["perf", "complexity", "deps"])
def test_resume_restores_sampler_state_exactly(sampler, tmp_path):
    full_trainer, full_module, full_rec = fit(sampler=sampler, ckpt_dir=tmp_path / "ckpt")
    reference = flat_state(full_module)
    for name in ("step=3.ckpt", "step=6.ckpt"):
        trainer, module, rec = fit(sampler=sampler, ckpt_path=str(tmp_path / "ckpt" / name))
        assert trainer.global_step == 8
        assert rec.steps == full_rec.steps[-len(rec.steps):], name
        assert max_abs_diff(flat_state(module), reference) <= 1e-6, name
        assert_same_state(module.sampler.state_dict(), full_module.sampler.state_dict(), name, tol=0.0)
        assert trainer.callbacks[1].total_executed == full_trainer.callbacks[1].total_executed, name
    if sampler == "perf":
        assert sum(len(b) for b in full_module.sampler.banks) > 0


ALLREDUCES = [0]


def counting_allreduce(state, bucket):
    ALLREDUCES[0] += 1
    return default_hooks.allreduce_hook(state, bucket)


class CommHook(Callback):
    def on_train_start(self, trainer, pl_module):  # Lightning registers ddp_comm_hook on CUDA only
        trainer.strategy.model.register_comm_hook(None, counting_allreduce)


@pytest.mark.parametrize("sampler", ["perf", "deps"])  # deps: the shrink-start reorganization at step 3
def test_ddp_two_ranks_train_identical_subnets(sampler, tmp_path):
    seeded(0)
    module = tiny_supernet("vit", sampler=SAMPLERS[sampler]())
    strategy = DDPStrategy(start_method="spawn")  # find_unused_parameters off (the default)
    callbacks = [CommHook(), DrawRecorder(str(tmp_path))]
    trainer = make_trainer(strategy=strategy, devices=2, max_steps=6, callbacks=callbacks)
    trainer.fit(module, datamodule=digits())
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert len(ranks[0]["steps"]) == 6 and ranks[0]["steps"] == ranks[1]["steps"]
    assert len({tuple(s) for s in ranks[0]["steps"]}) > 1
    assert max_abs_diff(ranks[0]["weights"], ranks[1]["weights"]) == 0.0
    assert_same_state(ranks[0]["sampler"], ranks[1]["sampler"], tol=0.0)
    # all subnets of a step share one backward: one gradient all-reduce per step (one bucket: tiny model)
    assert ranks[0]["allreduces"] == 6


def test_every_parameter_gets_a_gradient_without_teacher():
    """Uniform sampling may skip the largest subnet; a zero-weighted touch of every parameter still
    gives each a gradient, which is what lets DDP run with find_unused_parameters off."""
    seeded(0)
    module = tiny_supernet("vit", sampler=Uniform(k=1))
    trainer = make_trainer(max_steps=1)
    trainer.fit(module, datamodule=digits())  # binds the sampler
    x, y = next(iter(trainer.datamodule.train_dataloader()))
    module.zero_grad(set_to_none=True)
    module.trainer = None  # a bare call: step 0
    assert module.space.max() not in [d.config for d in module.sampler.sample(0)]
    module.training_step((x, y), 0).backward()
    assert all(p.grad is not None for p in module.parameters())


def test_delayed_shrinking_trains_only_the_full_model_first():
    seeded(0)
    module = tiny_supernet("vit", sampler=DelayedShrinking(start_fraction=0.5, warmup_fraction=0.25, k=1))
    recorder = DrawRecorder()
    make_trainer(max_steps=8, callbacks=[recorder]).fit(module, datamodule=digits())
    assert [len(s) for s in recorder.steps] == [1, 1, 1, 1, 3, 3, 3, 3]


def test_bad_module_args():
    with pytest.raises(ValueError, match=r"Expected `arch` in \['vit', 'gpt'\], got arch='cnn'"):
        SupernetModule("cnn")
    with pytest.raises(ValueError, match=r"Expected `distill` in \['kl', 'alpha', 'none'\]"):
        SupernetModule(distill="mse")
    with pytest.raises(ValueError, match=r"Expected `distill_weight` in \[0, 1\], got distill_weight=2"):
        SupernetModule(distill_weight=2)
    with pytest.raises(ValueError, match=r"Expected `temperature` in \(0, inf\), got temperature=0.0"):
        SupernetModule(temperature=0.0)
    with pytest.raises(ValueError, match=r"Expected `embed_dim` to be strictly increasing"):
        SupernetModule(space={"embed_dim": [64, 32], "depth": [1], "num_heads": [2], "mlp_ratio": [1.0]})


@pytest.mark.parametrize("config", ["supernet_vit_digits.yaml", "supernet_gpt_text.yaml"])
def test_configs_parse(config, tmp_path):
    path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", config)
    cli = LitEffCLI(args=["--config", path, "--model.sampler", "lit_eff.supernet.ComplexityAware"], run=False)
    assert isinstance(cli.model, SupernetModule) and isinstance(cli.model.sampler, ComplexityAware)
    assert cli.model.space.to_dict() == yaml.safe_load(open(path))["model"]["init_args"]["space"]


def test_tensorboard_gets_the_accuracy_vs_flops_figure(tmp_path):
    """The figure is drawn on matplotlib's Agg canvas directly: the global backend stays as it was."""
    import matplotlib
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    before = matplotlib.get_backend()
    matplotlib.use("pdf")  # a backend the module must not replace
    try:
        seeded(0)
        module = tiny_supernet("vit")
        logger = TensorBoardLogger(str(tmp_path), name="tb")
        make_trainer(max_steps=6, logger=logger).fit(module, datamodule=digits())
        assert matplotlib.get_backend() == "pdf"
    finally:
        matplotlib.use(before)
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert "supernet/val_acc_vs_flops" in events.Tags()["images"]
    scalars = events.Tags()["scalars"]
    for cfg in module.val_configs:
        assert f"supernet/val_acc@{module.subnet_flops(cfg) / 1e6:.3g}" in scalars


class WeightMasker(MaskingTechnique):
    """A minimal weight-sparsity callback."""

    def mask_changes_after(self, step, total_steps):
        return None


SPARSITY = {"WeightMasker": WeightMasker, **{sid: s.build for sid, s in SETTINGS.items()
                                            if issubclass(s.cls, MaskingTechnique)}}


@pytest.mark.parametrize("sid", sorted(SPARSITY))
def test_weight_sparsity_callbacks_are_refused(sid):
    made = SPARSITY[sid]()
    # the masking callback alone (a setting's companions, e.g. Replay, need other data)
    callbacks = [cb for cb in (made if isinstance(made, list) else [made]) if isinstance(cb, MaskingTechnique)]
    name = type(callbacks[0]).__name__
    trainer = make_trainer(max_steps=2, callbacks=callbacks)
    with pytest.raises(ValueError, match=rf"SupernetModule does not take weight-sparsity callbacks, got {name}: "
                                         rf"every subnet slices the shared weights.*Remove {name}"):
        trainer.fit(tiny_supernet("vit"), datamodule=digits())
    assert trainer.global_step == 0
