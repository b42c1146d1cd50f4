"""The shared technique contract (DESIGN.md): every exported callback, through the same tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
import yaml
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

import lit_eff.callbacks
from lit_eff.callbacks import FlopsMonitor
from lit_eff.cli import LitEffCLI
from lit_eff.models.naming import clean_name
from lit_eff.sparsity import harden_state_dict
from tests.contract.settings import SETTINGS, Setting
from tests.helpers import MODELS, flat_state, make_trainer, max_abs_diff, seeded

IDS = sorted(SETTINGS)


def technique_of(callbacks: list[Callback], setting: Setting) -> Callback:
    return next(cb for cb in callbacks if type(cb) is setting.cls)


def fit(setting: Setting, ckpt_dir=None, ckpt_path=None, model_kwargs=None, compiled=False, extra=(),
        **trainer_kwargs):
    seeded(0)
    make_model, make_data = MODELS[setting.model]
    model, data = make_model(**(model_kwargs or {})), make_data()
    callbacks = [*setting.build(), *extra]
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=3, save_top_k=-1, filename="{step}"))
    trainer_kwargs.setdefault("max_steps", setting.steps)
    trainer = make_trainer(callbacks=callbacks, enable_checkpointing=ckpt_dir is not None, **trainer_kwargs)
    trainer.fit(torch.compile(model, backend="aot_eager") if compiled else model, datamodule=data,
                ckpt_path=ckpt_path)
    return trainer, model, technique_of(callbacks, setting)


def monitor_of(trainer) -> FlopsMonitor:
    return next(cb for cb in trainer.callbacks if isinstance(cb, FlopsMonitor))


def with_monitor(setting: Setting) -> list[Callback]:
    """A FlopsMonitor beside the technique, unless the setting already has one."""
    return [] if any(isinstance(cb, FlopsMonitor) for cb in setting.build()) else [FlopsMonitor()]


def test_every_exported_callback_has_a_setting():
    covered = {s.cls for s in SETTINGS.values()}
    exported = {getattr(lit_eff.callbacks, name) for name in lit_eff.callbacks.__all__}
    missing = [c.__name__ for c in exported if isinstance(c, type) and issubclass(c, Callback) and c not in covered]
    assert not missing, f"add these callbacks to tests/contract/settings.py: {missing}"


VARIANTS = {"plain": {}, "accumulate_2": {"accumulate_grad_batches": 2}, "bf16_mixed": {"precision": "bf16-mixed"}}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("sid", IDS)
def test_short_fit(sid, variant):
    """A short fit, also with gradient accumulation and with bf16 autocast on CPU."""
    setting = SETTINGS[sid]
    trainer, model, technique = fit(setting, **VARIANTS[variant])
    assert trainer.global_step > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if setting.check:
        setting.check(trainer, technique)


@pytest.mark.parametrize("sid", IDS)
def test_resume_equals_uninterrupted(sid, tmp_path):
    setting = SETTINGS[sid]
    full_trainer, full_model, full_technique = fit(setting, ckpt_dir=tmp_path / "ckpt")
    reference = flat_state(full_model)
    checkpoints = sorted(os.listdir(tmp_path / "ckpt"))
    assert "step=3.ckpt" in checkpoints  # mid-epoch (6 batches per epoch)
    for name in [c for c in checkpoints if c in ("step=3.ckpt", "step=6.ckpt")]:
        trainer, model, technique = fit(setting, ckpt_path=str(tmp_path / "ckpt" / name))
        assert trainer.global_step == full_trainer.global_step, name
        assert max_abs_diff(flat_state(model), reference) <= 1e-6, name
        assert_same_state(technique.state_dict(), full_technique.state_dict(), name)


def assert_same_state(a, b, where: str = "state", tol: float = 1e-6) -> None:
    """Callback states (nested dicts, lists, numbers, tensors) equal up to ``tol``."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {a.keys()} vs {b}"
        for key in a:
            assert_same_state(a[key], b[key], f"{where}.{key}", tol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]", tol)
    elif isinstance(a, torch.Tensor):
        assert a.shape == b.shape and (a.double() - b.double()).abs().max().item() <= tol if a.numel() else True, where
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=tol, abs=tol), f"{where}: {a} vs {b}"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


class RankRecorder(Callback):
    """Saves every rank's final weights and technique state, to compare ranks after ddp_spawn."""

    def __init__(self, folder):
        self.folder = folder

    def on_fit_end(self, trainer, pl_module):
        technique_states = {type(cb).__name__: cb.state_dict() for cb in trainer.callbacks
                            if type(cb).__module__.startswith("lit_eff")}
        torch.save({"weights": flat_state(pl_module), "techniques": technique_states, "step": trainer.global_step},
                   os.path.join(self.folder, f"rank{trainer.global_rank}.pt"))


@pytest.mark.parametrize("sid", IDS)
def test_ddp_two_processes(sid, tmp_path):
    """ddp_spawn: both ranks end identical, and the model the main process gets back after fit
    computes with the weights the last checkpoint holds (masks hardened, routers included)."""
    setting = SETTINGS[sid]
    seeded(0)
    make_model, make_data = MODELS[setting.model]
    callbacks = [*setting.build(), RankRecorder(str(tmp_path)),
                 ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)]
    strategy = "ddp_spawn_find_unused_parameters_true" if setting.find_unused_parameters else "ddp_spawn"
    trainer = make_trainer(strategy=strategy, devices=2, max_steps=setting.steps, callbacks=callbacks,
                           enable_checkpointing=True)
    model = make_model()
    trainer.fit(model, datamodule=make_data())
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"] > 0
    assert max_abs_diff(ranks[0]["weights"], ranks[1]["weights"]) == 0.0
    assert_same_state(ranks[0]["techniques"], ranks[1]["techniques"], tol=0.0)
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    saved = setting.returned(checkpoint) if setting.returned else checkpoint["state_dict"]
    returned = harden_state_dict(model.state_dict())
    assert max_abs_diff(returned, harden_state_dict(saved)) == 0.0


@pytest.fixture(scope="module")
def distributed_runs(tmp_path_factory, request):
    """The selected settings in two CPU processes under DDP and under FSDP2, in one launch
    (tests/contract/distributed_runner.py)."""
    selected = sorted({item.callspec.params["sid"] for item in request.session.items
                       if getattr(item, "originalname", "") == "test_fsdp2_equals_ddp"
                       and item.module.__name__ == __name__})
    out = tmp_path_factory.mktemp("distributed")
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "tests.contract.distributed_runner", str(out), *selected], cwd=root,
                          env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


@pytest.mark.parametrize("sid", IDS)
def test_fsdp2_equals_ddp(sid, distributed_runs):
    """FSDP2 (ModelParallelStrategy, one shard per block, two CPU processes) ends with the same
    weights and technique state as DDP, or the technique refuses it before training."""
    setting = SETTINGS[sid]
    ddp, fsdp2 = (distributed_runs / sid / name for name in ("ddp", "fsdp2"))
    assert not (ddp / "error.txt").exists(), (ddp / "error.txt").read_text()
    if setting.fsdp2_refusal is not None:
        assert (fsdp2 / "error.txt").exists(), "expected a refusal under FSDP2"
        message = (fsdp2 / "error.txt").read_text().split("\n\n")[0]
        assert re.search(setting.fsdp2_refusal, message), message
        return
    assert not (fsdp2 / "error.txt").exists(), (fsdp2 / "error.txt").read_text()
    reference = torch.load(ddp / "rank0.pt", weights_only=False)
    for rank in (0, 1):
        sharded = torch.load(fsdp2 / f"rank{rank}.pt", weights_only=False)
        assert sharded["step"] == reference["step"] > 0
        assert max_abs_diff(sharded["weights"], reference["weights"]) <= 1e-5
        assert_same_state(sharded["techniques"], reference["techniques"], tol=1e-5)


class CompileRecorder(Callback):
    """How many graphs torch.compile built during each training batch."""

    def __init__(self):
        self.per_batch: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = torch._dynamo.utils.counters["stats"]["unique_graphs"]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.per_batch.append(torch._dynamo.utils.counters["stats"]["unique_graphs"] - self._before)


_PLAIN_COMPILES: dict[str, set[int]] = {}
PLAIN_AS = {"vit-seq": "vit"}  # the same model on task-split digits compiles on the same batches (measured)


def plain_compiles(model_family: str) -> set[int]:
    """The training batches on which torch.compile builds graphs for the model alone (no kit
    callback): Lightning's own recompiles (``batch_idx`` becoming dynamic, a new epoch) that a
    technique must not add to."""
    if model_family not in _PLAIN_COMPILES:
        torch._dynamo.reset()
        seeded(0)
        make_model, make_data = MODELS[model_family]
        recorder = CompileRecorder()
        make_trainer(max_steps=8, callbacks=[recorder]).fit(torch.compile(make_model(), backend="aot_eager"),
                                                           datamodule=make_data())
        torch._dynamo.reset()
        _PLAIN_COMPILES[model_family] = {i for i, built in enumerate(recorder.per_batch) if built}
    return _PLAIN_COMPILES[model_family]


@pytest.mark.parametrize("sid", IDS)
def test_compiled_equals_eager(sid):
    """torch.compile(lightning_module) (aot_eager backend): the same weights, technique state and
    FLOPs as eager, and no compiling beyond the model's own, except on the batches where the
    technique's schedule changes phase (``compile_phases``) and the batch FlopsMonitor counts."""
    setting = SETTINGS[sid]
    plain = plain_compiles(PLAIN_AS.get(setting.model, setting.model))
    eager_trainer, eager_model, eager_technique = fit(setting, extra=with_monitor(setting))
    eager_flops = monitor_of(eager_trainer).total_executed
    torch._dynamo.reset()
    recorder = CompileRecorder()
    trainer, model, technique = fit(setting, compiled=True, extra=[*with_monitor(setting), recorder])
    try:
        assert trainer.global_step == eager_trainer.global_step
        compiled_state = {clean_name(k): v for k, v in flat_state(model).items()}
        assert max_abs_diff(compiled_state, flat_state(eager_model)) <= 1e-5
        assert_same_state(technique.state_dict(), eager_technique.state_dict(), tol=1e-5)
        assert monitor_of(trainer).total_executed == eager_flops
        # FlopsMonitor runs the first batch eagerly (to count it), so the model's first
        # compile moves one batch later
        extra = [i for i, built in enumerate(recorder.per_batch)
                 if built and i not in plain and i - 1 not in plain and i >= 2]
        assert len(extra) <= setting.compile_phases, f"compiled again on batches {extra} (plain model: {sorted(plain)})"
        if setting.check:
            setting.check(trainer, technique)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("sid", IDS)
def test_checkpointed_equals_plain(sid):
    """Activation checkpointing (the model's own set_grad_checkpointing) changes nothing: the same
    weights, technique state and FLOPs (the recompute is not counted again)."""
    setting = SETTINGS[sid]
    plain_trainer, plain_model, plain_technique = fit(setting, extra=with_monitor(setting))
    trainer, model, technique = fit(setting, model_kwargs={"activation_checkpointing": True},
                                    extra=with_monitor(setting))
    assert max_abs_diff(flat_state(model), flat_state(plain_model)) <= 1e-6
    assert_same_state(technique.state_dict(), plain_technique.state_dict(), tol=1e-6)
    assert monitor_of(trainer).total_executed == monitor_of(plain_trainer).total_executed
    if setting.check:
        setting.check(trainer, technique)


@pytest.mark.parametrize("sid", IDS)
def test_yaml_round_trip_through_cli(sid, tmp_path):
    setting = SETTINGS[sid]
    # the base configs already hold the FlopsMonitor companions need
    technique = setting.cls(**setting.kwargs)
    fragment = {"trainer": {"callbacks+": [
        {"class_path": f"{type(technique).__module__}.{type(technique).__name__}", "init_args": _init_args(technique)}
    ]}}
    path = tmp_path / "technique.yaml"
    path.write_text(yaml.safe_dump(fragment))
    base_name = {"vit": "vit_digits.yaml", "vit-seq": "vit_digits.yaml", "cnn": "cnn_digits.yaml"}.get(setting.model,
                                                                                             "gpt_text.yaml")
    base = yaml.safe_load(open(os.path.join(CONFIGS, base_name)))
    # a base config that already holds this technique (FlopsMonitor) gets it from the fragment only
    base["trainer"]["callbacks"] = [c for c in base["trainer"]["callbacks"]
                                    if not c["class_path"].endswith("." + setting.cls.__name__)]
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    cli = LitEffCLI(args=["--config", str(tmp_path / "base.yaml"), "--config", str(path)], run=False)
    built = [cb for cb in cli.trainer.callbacks if type(cb) is setting.cls]
    assert len(built) == 1, "the fragment must add exactly one instance"
    assert _init_args(built[0]) == _init_args(technique)
    # the base config's own callbacks are still there: the fragment appended, not replaced
    assert any(isinstance(cb, ModelCheckpoint) for cb in cli.trainer.callbacks)


CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")


def _init_args(callback: Callback) -> dict:
    import inspect

    params = inspect.signature(type(callback).__init__).parameters
    return {name: getattr(callback, name) for name in params if name != "self" and hasattr(callback, name)}
