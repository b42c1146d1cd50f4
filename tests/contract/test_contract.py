"""The shared technique contract (DESIGN.md): every exported callback, through the same tests."""

from __future__ import annotations

import os

import pytest
import torch
import yaml
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

import lit_eff.callbacks
from lit_eff.cli import LitEffCLI
from tests.contract.settings import SETTINGS, Setting
from tests.helpers import MODELS, flat_state, make_trainer, max_abs_diff, seeded

IDS = sorted(SETTINGS)


def technique_of(callbacks: list[Callback], setting: Setting) -> Callback:
    return next(cb for cb in callbacks if type(cb) is setting.cls)


def fit(setting: Setting, ckpt_dir=None, ckpt_path=None, **trainer_kwargs):
    seeded(0)
    make_model, make_data = MODELS[setting.model]
    model, data = make_model(), make_data()
    callbacks = setting.build()
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=3, save_top_k=-1, filename="{step}"))
    trainer_kwargs.setdefault("max_steps", setting.steps)
    trainer = make_trainer(callbacks=callbacks, enable_checkpointing=ckpt_dir is not None, **trainer_kwargs)
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return trainer, model, technique_of(callbacks, setting)


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
        technique_states = {type(cb).__name__: cb.state_dict() for cb in trainer.callbacks}
        torch.save({"weights": flat_state(pl_module), "techniques": technique_states, "step": trainer.global_step},
                   os.path.join(self.folder, f"rank{trainer.global_rank}.pt"))


@pytest.mark.parametrize("sid", IDS)
def test_ddp_two_processes(sid, tmp_path):
    setting = SETTINGS[sid]
    seeded(0)
    make_model, make_data = MODELS[setting.model]
    callbacks = [*setting.build(), RankRecorder(str(tmp_path))]
    trainer = make_trainer(strategy="ddp_spawn", devices=2, max_steps=setting.steps, callbacks=callbacks)
    trainer.fit(make_model(), datamodule=make_data())
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"] > 0
    assert max_abs_diff(ranks[0]["weights"], ranks[1]["weights"]) == 0.0
    assert_same_state(ranks[0]["techniques"], ranks[1]["techniques"], tol=0.0)


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
    base_name = {"vit": "vit_digits.yaml", "cnn": "cnn_digits.yaml", "gpt": "gpt_text.yaml"}[setting.model]
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
