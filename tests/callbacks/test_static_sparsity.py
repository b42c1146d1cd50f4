"""StaticSparsity (SPDF): fixed masks kept exact through AdamW, the release within one run (pruned
weights exactly 0 at that moment, then learning), the across-runs path (init_weights from a sparse
checkpoint), densities, errors and claims."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback

from lit_eff import sparsity
from lit_eff.callbacks import FlopsMonitor, MagnitudePruning, StaticSparsity
from lit_eff.flops import get_density
from tests.helpers import MODELS, make_trainer, seeded, tiny_gpt, tiny_vit


def run(callbacks, model="vit", module=None, **trainer_kwargs):
    seeded(0)
    make_model, make_data = MODELS[model]
    module = module if module is not None else make_model()
    trainer_kwargs.setdefault("max_steps", 2)
    trainer = make_trainer(callbacks=callbacks, **trainer_kwargs)
    trainer.fit(module, datamodule=make_data())
    return trainer, module


def dense(module):
    return module.parametrizations.weight.original


class Probe(Callback):
    """After each optimizer step (placed after the technique): dense weights, masks, AdamW state."""

    def __init__(self, technique):
        self.technique = technique
        self.weights, self.masks, self.states, self.densities = {}, {}, {}, {}
        self._last = -1

    def on_train_start(self, trainer, pl_module):
        self._last = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self._last:
            return
        self._last = step = trainer.global_step
        targets = self.technique.targets
        state = trainer.optimizers[0].state
        self.weights[step] = {n: dense(m).detach().clone() for n, m in targets.items()}
        self.masks[step] = {n: sparsity.get_mask(m).clone() for n, m in targets.items()}
        self.states[step] = {n: [v.clone() for v in state[dense(m)].values() if v.shape == dense(m).shape]
                             for n, m in targets.items()}
        self.densities[step] = {n: get_density(m) for n, m in targets.items()}


def test_release_within_one_run():
    """Steps 1-3 sparse (weights, AdamW moments exactly 0 where pruned); released after step 3:
    all-ones masks, density 1, and the pruned weights, 0 at that moment, learn afterwards."""
    technique = StaticSparsity(sparsity=0.75, release_step=3)
    probe = Probe(technique)
    monitor = FlopsMonitor()
    run([monitor, technique, probe], max_steps=6)
    initial = probe.masks[1]
    for name, mask in initial.items():
        assert int(mask.sum()) == round(0.25 * mask.numel()), name
    for step in (1, 2, 3):
        for name, pruned in ((n, ~m) for n, m in initial.items()):
            assert (probe.weights[step][name][pruned] == 0).all(), (step, name)
            assert len(probe.states[step][name]) == 2
            assert all((v[pruned] == 0).all() for v in probe.states[step][name]), (step, name)
            if step < 3:
                assert torch.equal(probe.masks[step][name], initial[name])
                assert probe.densities[step][name] == pytest.approx(0.25, abs=0.01)
    assert technique.released and technique.state_dict()["released_at"] == 3
    for name, pruned in ((n, ~m) for n, m in initial.items()):
        assert probe.masks[3][name].all() and probe.densities[3][name] == 1.0
        moved = probe.weights[6][name][pruned]
        assert (moved != 0).float().mean() > 0.5, name  # the pruned weights now learn
    assert monitor.last_step_effective == monitor.last_step_executed  # dense after the release


def test_release_fraction_and_no_release():
    technique = StaticSparsity(sparsity=0.5, release_fraction=0.5)
    run([technique], max_steps=4)
    assert technique.resolved_release_step == 2 and technique.released
    never = StaticSparsity(sparsity=0.5)
    run([never], max_steps=3)
    assert never.resolved_release_step is None and not never.released
    for name, module in never.targets.items():
        assert (dense(module)[~sparsity.get_mask(module)] == 0).all(), name


def test_magnitude_masks_keep_the_largest_initial_weights_with_erk_densities():
    seeded(0)
    module = tiny_gpt()
    targets = sparsity.find_targets(module)
    initial = {n: m.weight.detach().clone() for n, m in targets.items()}
    technique = StaticSparsity(sparsity=0.6, mask="magnitude", distribution="erk")
    run([technique], model="gpt", module=module, max_steps=1)
    shapes = {n: tuple(w.shape) for n, w in initial.items()}
    expected = sparsity.erk_densities(shapes, 0.4)
    assert technique.densities == pytest.approx(expected)
    assert len(set(round(d, 6) for d in expected.values())) > 1  # ERK: layers differ
    for name, weight in initial.items():
        mask = sparsity.get_mask(technique.targets[name])
        assert torch.equal(mask, sparsity.magnitude_mask(weight, 1.0 - expected[name])), name


def test_fine_tune_across_runs_from_a_sparse_checkpoint(tmp_path):
    """Sparse run, checkpoint, then a model built with init_weights and no sparsity callback: the
    pruned weights start at exactly 0 and then change."""
    technique = StaticSparsity(sparsity=0.75)
    trainer, sparse_model = run([technique], max_steps=2)
    path = tmp_path / "sparse.ckpt"
    trainer.save_checkpoint(path)
    pruned = {n: ~sparsity.get_mask(m).clone() for n, m in technique.targets.items()}
    hardened = {n: m.weight.detach().clone() for n, m in technique.targets.items()}

    seeded(1)
    model = tiny_vit(init_weights=str(path))
    assert "init_weights" not in model.hparams
    layers = dict(model.named_modules())
    for name, mask in pruned.items():
        assert not sparsity.has_mask(layers[name])
        assert torch.equal(layers[name].weight, hardened[name]), name
        assert (layers[name].weight[mask] == 0).all(), name
    run([], module=model, max_steps=2)
    for name, mask in pruned.items():
        assert (layers[name].weight[mask] != 0).float().mean() > 0.5, name


def test_causal_lm_init_weights_from_a_masked_state_dict(tmp_path):
    """A plain state dict with lit_eff masks (no Trainer) loads hardened into a CausalLM."""
    seeded(0)
    source = tiny_gpt()
    layer = source.model.blocks[0].mlp.fc1
    sparsity.attach_mask(layer, mask=sparsity.magnitude_mask(layer.weight, 0.5), ste=False)
    path = tmp_path / "masked.pt"
    torch.save(source.state_dict(), path)
    loaded = tiny_gpt(init_weights=str(path))
    assert torch.equal(loaded.model.blocks[0].mlp.fc1.weight, layer.weight)
    assert int((loaded.model.blocks[0].mlp.fc1.weight == 0).sum()) == layer.weight.numel() // 2
    assert loaded.model.head.weight is loaded.model.wte.weight  # the tie survives loading


def test_init_weights_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        tiny_vit(init_weights=str(tmp_path / "missing.ckpt"))
    path = tmp_path / "gpt.pt"
    torch.save(tiny_gpt().state_dict(), path)
    with pytest.raises(ValueError, match=r"do not fit ImageClassifier: missing \['model.cls_token'"):
        tiny_vit(init_weights=str(path))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"sparsity": 1.0}, r"Expected `sparsity` in \[0, 1\), got sparsity=1.0"),
    ({"sparsity": "0.5"}, r"Expected `sparsity` in \[0, 1\), got sparsity='0.5'"),
    ({"mask": "topk"}, r"Expected `mask` in \['random', 'magnitude'\], got mask='topk'"),
    ({"distribution": "normal"}, r"Expected `distribution` in \['uniform', 'erk'\]"),
    ({"release_step": 0}, "Expected `release_step` to be an integer >= 1 or None, got release_step=0"),
    ({"release_fraction": 1.0}, r"Expected `release_fraction` in \(0, 1\), got release_fraction=1.0"),
    ({"release_step": 5, "release_fraction": 0.5}, "at most one of `release_step` and `release_fraction`"),
    ({"include": "*fc1"}, "Expected `include` to be a list of name patterns"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StaticSparsity(**kwargs)


def test_no_matching_layer_lists_layers():
    with pytest.raises(ValueError, match=r"No linear layer matched include=\['\*nothing\*'\].*blocks.0"):
        run([StaticSparsity(include=["*nothing*"])], max_steps=1)


@pytest.mark.parametrize("order", ["static_first", "pruning_first"])
def test_refuses_a_weight_another_sparsity_callback_masks(order):
    static, pruning = StaticSparsity(sparsity=0.5), MagnitudePruning(final_sparsity=0.5, end_step=4)
    callbacks = [static, pruning] if order == "static_first" else [pruning, static]
    second = type(callbacks[1]).__name__
    with pytest.raises(ValueError, match=rf"already masked by {type(callbacks[0]).__name__} "
                                         rf"\(trainer.callbacks\[0\]\); {second} \(trainer.callbacks\[1\]\)"):
        run(callbacks, max_steps=1)


def test_documented_two_run_command_sequence(tmp_path):
    """`lit-eff fit ... spdf_pretrain.yaml`, then `--model.init_args.init_weights last.ckpt` without
    the callback: the second run's model starts with the first run's pruned weights at exactly 0."""
    import glob
    import os

    from lit_eff.cli import main

    configs = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
    fast = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--test_after_fit", "false",
            "--trainer.enable_progress_bar", "false"]
    main(["fit", "--config", os.path.join(configs, "vit_digits.yaml"), "--config",
          os.path.join(configs, "techniques", "spdf_pretrain.yaml"), *fast])
    (last,) = glob.glob("lightning_logs/version_*/checkpoints/last.ckpt")
    state = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]
    masks = {k.removesuffix(".parametrizations.weight.0.mask"): v for k, v in state.items() if k.endswith(".0.mask")}
    assert masks and all(float(m.float().mean()) == 0.25 for m in masks.values())

    from lit_eff.cli import LitEffCLI

    cli = LitEffCLI(args=["--config", os.path.join(configs, "vit_digits.yaml"), "--model.init_args.init_weights",
                          last], run=False)
    assert not any(isinstance(cb, StaticSparsity) for cb in cli.trainer.callbacks)
    weights = cli.model.state_dict()
    for key, mask in masks.items():
        assert (weights[f"{key}.weight"][~mask] == 0).all(), key
        assert (weights[f"{key}.weight"][mask] != 0).all(), key
