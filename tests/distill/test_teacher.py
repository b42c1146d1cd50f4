"""Teachers from kit checkpoints, state dicts (torch, timm, safetensors) and their errors."""

from __future__ import annotations

import pytest
import torch

from lit_eff import sparsity
from lit_eff.distill import build_teacher
from tests.distill.common import gpt, load_kit_network, save_kit_teacher, vit
from tests.helpers import TINY_VIT

X = torch.randn(3, 1, 8, 8)


def same_network(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return a.state_dict().keys() == b.state_dict().keys() and all(
        torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_kit_checkpoint_is_rebuilt_from_its_hyperparameters_frozen_in_eval_mode(tmp_path):
    path = save_kit_teacher(tmp_path, "gpt", n_layer=3, n_embd=48)  # not the student's shape
    student = gpt()
    before = torch.get_rng_state()
    teacher = build_teacher(path, student=student)
    assert torch.equal(torch.get_rng_state(), before)  # building drew no number from the run's stream
    assert type(teacher).__name__ == "GPT" and len(teacher.blocks) == 3 and teacher.head.in_features == 48
    assert same_network(teacher, load_kit_network(path, "gpt"))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_the_class_lightning_cli_records_is_used(tmp_path):
    path = save_kit_teacher(tmp_path)
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["hyper_parameters"].update(_class_path="lit_eff.models.ImageClassifier",
                                          _instantiator="lightning.pytorch.cli.instantiate_module")
    torch.save(checkpoint, path)
    teacher = build_teacher(path, student=None)  # no student class needed
    assert same_network(teacher, load_kit_network(path))


@pytest.mark.parametrize("prefix", ["model.", ""])
def test_state_dict_with_the_students_architecture(tmp_path, prefix):
    torch.manual_seed(3)
    source = vit()
    state = source.state_dict() if prefix else source.model.state_dict()  # kit module or bare timm keys
    torch.save(state, tmp_path / "weights.pt")
    teacher = build_teacher(str(tmp_path / "weights.pt"), "student", student=vit())
    assert same_network(teacher, source.model)


def test_timm_model_name_with_its_arguments_and_a_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    source = vit()
    save_file(source.model.state_dict(), str(tmp_path / "weights.safetensors"))
    teacher = build_teacher(str(tmp_path / "weights.safetensors"), "vit_tiny_patch16_224",
                            {"num_classes": 10, "in_chans": 1, **TINY_VIT})
    assert torch.equal(teacher(X), source.model.eval()(X))


def test_a_masked_teacher_loads_with_its_masks_hardened(tmp_path):
    torch.manual_seed(3)
    source = vit()
    layer = source.model.blocks[0].mlp.fc1
    mask = sparsity.nm_mask(layer.weight, 2, 4)
    dense = layer.weight.detach().clone()
    sparsity.attach_mask(layer, mask=mask, density=0.5)
    torch.save({"state_dict": source.state_dict(), "hyper_parameters": dict(source.hparams)}, tmp_path / "t.ckpt")
    teacher = build_teacher(str(tmp_path / "t.ckpt"), student=vit())
    assert torch.equal(teacher.blocks[0].mlp.fc1.weight, dense * mask)


def test_errors_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match=r"Expected `teacher` to be a checkpoint file, got teacher='.*nothing.ckpt' "
                                         r"\(no such file\)"):
        build_teacher(str(tmp_path / "nothing.ckpt"))
    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"Could not read `teacher`='.*garbage.ckpt' as a checkpoint"):
        build_teacher(str(tmp_path / "garbage.ckpt"))
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"Expected `teacher` to hold a Lightning checkpoint or a state dict, got list"):
        build_teacher(str(tmp_path / "list.pt"))
    torch.save(vit().state_dict(), tmp_path / "weights.pt")
    with pytest.raises(ValueError, match=r"holds no hyperparameters to rebuild its model from .*set `teacher_model`"):
        build_teacher(str(tmp_path / "weights.pt"), student=vit())
    with pytest.raises(ValueError, match=r"Expected `teacher_model` to be None, 'student' or a timm model name, got "
                                         r"teacher_model='no_such_net'"):
        build_teacher(str(tmp_path / "weights.pt"), "no_such_net")
    with pytest.raises(ValueError, match=r"The weights in `teacher`='.*weights.pt' do not fit the teacher GPT: missing "
                                         r"\['norm.bias', 'norm.weight', 'wpe.weight', 'wte.weight'\], unexpected \['cls_token'"):
        build_teacher(str(tmp_path / "weights.pt"), "student", student=gpt())
    path = save_kit_teacher(tmp_path)
    with pytest.raises(ValueError, match=r"The weights in `teacher`=.* do not fit the teacher VisionTransformer: shapes "
                                         r"differ: head.weight \(10, 32\) in the file, \(5, 32\) in the model"):
        build_teacher(path, None, {"num_classes": 5}, student=vit())
    with pytest.raises(ValueError, match=r"Could not rebuild the teacher as ImageClassifier\(\*\*hyperparameters of "
                                         r"teacher=.*\): TypeError"):
        build_teacher(path, None, {"no_such_argument": 1}, student=vit())
