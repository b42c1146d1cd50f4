"""SparseIFT in a fit: the enlarged MLPs, trained by RigL at the transformation's sparsity, spend the
dense model's effective FLOPs (±2%, also where the widths round); the fit refuses to start when
no sparsity callback keeps the enlarged layers at that sparsity."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback

from lit_eff import sparsity
from lit_eff.callbacks import DynamicSparsity, FlopsMonitor, SparseIFT, StaticSparsity
from lit_eff.flops import count_flops
from tests.helpers import MODELS, fit, make_trainer, seeded


class Masks(Callback):
    """The mask of the first enlarged layer at the start of each step."""

    def __init__(self, technique: SparseIFT):
        self.technique, self.masks = technique, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.masks.append(sparsity.get_mask(next(iter(self.technique.sparse.values()))).clone())


def _rigl(s: float, **kwargs) -> DynamicSparsity:
    return DynamicSparsity(sparsity=s, method="rigl", include=["*blocks.*.mlp.*"], **kwargs)


@pytest.mark.parametrize("model, transform, s", [("vit", "wide", 0.7), ("gpt", "parallel", 0.75)])
def test_effective_flops_equal_the_dense_models(model, transform, s):
    """s = 0.7 on the ViT rounds the hidden width (64 / 0.3 -> 213): still within 2% of dense."""
    technique, monitor = SparseIFT(transform=transform, sparsity=s), FlopsMonitor()
    masks = Masks(technique)
    trainer, module = fit([monitor, technique, _rigl(s, update_every=1, drop_fraction=0.5, stop_fraction=1.0),
                           masks], model, max_steps=3)
    seeded(0)
    dense = MODELS[model][0]()
    batch = next(iter(trainer.datamodule.train_dataloader()))[0]
    dense_flops = count_flops(lambda: dense(batch)).total
    assert monitor.last_step_effective == pytest.approx(dense_flops, rel=0.02)
    assert monitor.last_step_executed > 1.3 * dense_flops  # the enlarged layers run dense on the CPU
    # RigL moved the masks of the enlarged layers and kept their density at 1 - s
    assert not torch.equal(masks.masks[0], masks.masks[-1])
    for name, layer in technique.sparse.items():
        assert sparsity.get_mask(layer).float().mean().item() == pytest.approx(1 - s, abs=1e-3), name


def test_refuses_without_a_sparsity_callback_on_the_enlarged_layers():
    with pytest.raises(ValueError, match=r"made `model.blocks.0.mlp.fc1` 2x larger.*no sparsity callback masks it.*"
                                         r"add DynamicSparsity\(sparsity=0.5"):
        fit([SparseIFT(transform="wide", sparsity=0.5)], "vit")


def test_refuses_a_density_that_is_not_the_transformations():
    with pytest.raises(ValueError, match=r"masks `model.blocks.0.mlp.fc1` at density 0.5.*only at density 0.25"):
        fit([SparseIFT(transform="wide", sparsity=0.75), _rigl(0.5)], "vit")


def test_refuses_a_sparsity_callback_placed_before_it():
    with pytest.raises(ValueError, match=r"already masks `model.blocks.0.mlp.fc1`.*put SparseIFT before it"):
        fit([StaticSparsity(sparsity=0.5, include=["*blocks.*.mlp.*"]), SparseIFT(transform="wide", sparsity=0.5)],
            "vit")


def test_warns_when_the_sparsity_callback_also_masks_other_layers():
    with pytest.warns(UserWarning, match=r"masked layers .*attn.* are not ones SparseIFT enlarged"):
        fit([SparseIFT(transform="wide", sparsity=0.5), DynamicSparsity(sparsity=0.5)], "vit", max_steps=1)


@pytest.mark.parametrize("kwargs, match", [
    ({"transform": "tall"}, r"`transform`.*wide.*parallel.*'tall'"),
    ({"sparsity": 1.0}, r"`sparsity`.*1\.0"),
    ({"transform": "parallel", "sparsity": 0.7}, r"whole number of branches.*sparsity=0\.7"),
    ({"include": "blocks"}, r"`include`"),
])
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseIFT(**kwargs)


def test_a_transformed_model_is_adopted_with_the_same_settings_and_refused_with_others():
    """E.g. the main process's model after a ddp_spawn fit (restored structure), fitted or tested again."""
    from lit_eff.sparsity.ift import sparse_ift

    seeded(0)
    module, data = MODELS["vit"][0](), MODELS["vit"][1]()
    layers = sparse_ift(module.model, "wide", 0.5)
    technique = SparseIFT(transform="wide", sparsity=0.5)
    fit_again = make_trainer(callbacks=[technique, _rigl(0.5)], max_steps=1)
    fit_again.fit(module, datamodule=data)
    assert {id(m) for m in technique.layers.values()} == {id(m) for m in layers.values()}
    assert module.model.blocks[0].mlp.fc1.out_features == 128  # not widened twice
    with pytest.raises(ValueError, match=r"already Sparse-IFT transformed \(wide x2\).*transform='parallel'"):
        make_trainer(callbacks=[SparseIFT(transform="parallel", sparsity=0.5), _rigl(0.5)], max_steps=1).fit(
            module, datamodule=data)
