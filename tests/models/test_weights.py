"""init_weights: fine-tuning from a lit_eff checkpoint, a plain timm/torch state dict (prefixes,
nesting, wrappers) or a safetensors file; a different head fails naming it unless skipped on
request; nothing is unpickled beyond tensors."""

import fractions

import pytest
import timm
import torch

from lit_eff.models import ImageClassifier
from tests.helpers import TINY_VIT, seeded, tiny_vit


def timm_vit(num_classes=10, seed=1):
    seeded(seed)
    return timm.create_model("vit_tiny_patch16_224", num_classes=num_classes, in_chans=1, **TINY_VIT)


def same(a, b):
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) for k in a)


def test_a_timm_state_dict_loads_into_the_kit_model(tmp_path):
    source = timm_vit().state_dict()
    torch.save(source, tmp_path / "vit.pth")
    seeded(0)
    model = tiny_vit(init_weights=str(tmp_path / "vit.pth"))
    assert same(model.model.state_dict(), source)


@pytest.mark.parametrize("wrap", ["nested_model", "nested_state_dict_ddp", "compiled", "safetensors"])
def test_nested_and_wrapped_state_dicts_load(wrap, tmp_path):
    source = timm_vit().state_dict()
    path = tmp_path / ("vit.safetensors" if wrap == "safetensors" else "vit.pt")
    if wrap == "nested_model":  # DeiT-style training checkpoint
        torch.save({"model": source, "epoch": 3}, path)
    elif wrap == "nested_state_dict_ddp":  # a DDP-wrapped model saved by a training script
        torch.save({"state_dict": {f"module.{k}": v for k, v in source.items()}, "epoch": 3}, path)
    elif wrap == "compiled":
        torch.save({f"_orig_mod.{k}": v for k, v in source.items()}, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in source.items()}, str(path))
    assert same(tiny_vit(init_weights=str(path)).model.state_dict(), source)


def test_a_lit_eff_checkpoint_loads(tmp_path):
    trained = tiny_vit()
    torch.save({"state_dict": trained.state_dict(), "global_step": 5}, tmp_path / "last.ckpt")
    assert same(tiny_vit(init_weights=str(tmp_path / "last.ckpt")).state_dict(), trained.state_dict())


def test_another_head_is_named_and_skipped_only_on_request(tmp_path):
    source = timm_vit(num_classes=1000).state_dict()
    torch.save(source, tmp_path / "in1k.pth")
    with pytest.raises(ValueError, match=r"do not fit ImageClassifier: other shapes: \['model.head.weight \(1000, 32\) "
                                         r"in the file, \(10, 32\) in the model', 'model.head.bias .*pass "
                                         r"init_weights_skip: \['model.head.\*'\]"):
        tiny_vit(init_weights=str(tmp_path / "in1k.pth"))
    seeded(0)
    fresh = tiny_vit().model.state_dict()
    seeded(0)
    model = tiny_vit(init_weights=str(tmp_path / "in1k.pth"), init_weights_skip=["model.head.*"])
    loaded = model.model.state_dict()
    for key, value in loaded.items():
        expected = fresh[key] if key.startswith("head.") else source[key]
        assert torch.equal(value, expected), key


def test_nothing_but_tensors_is_unpickled(tmp_path):
    path = tmp_path / "objects.ckpt"
    torch.save({"state_dict": tiny_vit().state_dict(), "extra": fractions.Fraction(1, 3)}, path)
    with pytest.raises(ValueError, match=r"cannot read init_weights .*objects.ckpt: it holds Python objects besides "
                                         r"tensors"):
        tiny_vit(init_weights=str(path))
    (tmp_path / "notes.txt").write_text("weights\n")
    with pytest.raises(ValueError, match=r"cannot read init_weights .*notes.txt: a text file"):
        tiny_vit(init_weights=str(tmp_path / "notes.txt"))
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pt")
    with pytest.raises(ValueError, match=r"expected a Lightning checkpoint or a state dict of tensors .*got a dict "
                                         r"with \['epoch', 'lr'\]"):
        tiny_vit(init_weights=str(tmp_path / "meta.pt"))


def test_init_weights_is_not_a_hyperparameter():
    assert "init_weights_skip" not in ImageClassifier("resnet10t", in_chans=1).hparams
