"""KnowledgeDistillation in Lightning: gradients by hand, FLOPs, composition, the teacher's
isolation, feature projections, resume, ddp_spawn and bad input."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision

from lit_eff.callbacks import FlopsMonitor, KnowledgeDistillation, NMSparsity
from lit_eff.distill import PROJECTIONS, Projection, kd_loss, network_of
from lit_eff.flops import count_flops
from tests.distill.common import gpt, load_kit_network, save_kit_teacher, vit
from tests.helpers import digits, flat_state, make_trainer, masked_layer_flops, max_abs_diff, seeded, text


class Recorder(Callback):
    """At each optimizer step: the student network's weights and the AMP loss scale at its start,
    its micro-batches, and the gradients (after unscaling); the projection at the end."""

    def __init__(self):
        self.starts, self.scales, self.batches, self.grads, self.projection = [], [], [], [], None

    @property
    def start(self):
        return self.starts[0]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx % trainer.accumulate_grad_batches == 0:
            self.starts.append(copy.deepcopy(network_of(pl_module).state_dict()))
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            self.scales.append(scaler.get_scale() if scaler is not None else 1.0)
            self.batches.append([])
        self.batches[-1].append([b.clone() for b in batch])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        net = network_of(pl_module)
        self.grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})

    def on_train_end(self, trainer, pl_module):
        projections = getattr(network_of(pl_module), PROJECTIONS, None)
        self.projection = None if projections is None else projections["0"].weight.detach().clone()


def fit(callbacks, module=None, data=None, ckpt_path=None, run_seed=None, **kwargs):
    """Seed 0 and fit (the tiny ViT on digits unless told); ``run_seed`` gives the techniques
    another run seed (``PL_GLOBAL_SEED``; the test fixture restores it)."""
    seeded(0)
    if run_seed is not None:
        os.environ["PL_GLOBAL_SEED"] = run_seed
    module = module if module is not None else vit()
    kwargs.setdefault("max_steps", 1)
    trainer = make_trainer(callbacks=callbacks, **kwargs)
    trainer.fit(module, datamodule=data if data is not None else digits(), ckpt_path=ckpt_path)
    return trainer, module


def relative_error(got: dict, expected: dict) -> float:
    assert got.keys() == expected.keys()
    return max(((got[k] - expected[k]).abs().max() / expected[k].abs().max().clamp_min(1e-12)).item() for k in got)


# --------------------------------------------------------------------------------------------
# the gradient is that of (1 - alpha) task + alpha KD + weight * hint
# --------------------------------------------------------------------------------------------
def fp16_with_grad_scaler():
    """Lightning turns precision="16-mixed" into bf16 on CPU; a plugin keeps fp16 autocast and a
    GradScaler, whose scale doubles after every step here (so the second step's scale differs)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1)
    return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=scaler)]}


VARIANTS = {"plain": (dict, None, 1e-5), "accumulate_2": (lambda: {"accumulate_grad_batches": 2}, None, 1e-5),
            "16-mixed": (fp16_with_grad_scaler, torch.float16, 1e-2),
            "bf16-mixed": (lambda: {"precision": "bf16-mixed"}, torch.bfloat16, 3e-2)}  # 8-bit mantissas


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_student_gradients_equal_the_weighted_sum_by_hand(variant, tmp_path):
    make_kwargs, dtype, tolerance = VARIANTS[variant]
    alpha, temperature, weight = 0.4, 3.0, 0.7
    path = save_kit_teacher(tmp_path, embed_dim=48)  # a wider teacher: the hint needs a projection
    recorder = Recorder()
    trainer, _ = fit([KnowledgeDistillation(path, temperature=temperature, alpha=alpha,
                                            features={"blocks.1": "blocks.1"}, feature_weight=weight), recorder],
                     max_steps=2, **make_kwargs())
    if variant == "16-mixed":
        assert recorder.scales == [2.0 ** 10, 2.0 ** 11]
    teacher = load_kit_network(path)
    for step in range(2):
        # by hand: the step's micro-batches from its start weights, in the same autocast and loss scale
        net = vit().model
        net.add_module(PROJECTIONS, torch.nn.ModuleDict({"0": Projection(32, 48)}))
        net.load_state_dict(recorder.starts[step])
        task_only = copy.deepcopy(net)
        loss_scale, batches = recorder.scales[step], recorder.batches[step]
        for x, y in batches:
            features = {}
            hooks = [net.blocks[1].register_forward_hook(lambda m, a, out: features.__setitem__("s", out)),
                     teacher.blocks[1].register_forward_hook(lambda m, a, out: features.__setitem__("t", out))]
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None, cache_enabled=False):
                logits = net(x)
                task = F.cross_entropy(logits.float(), y)
                with torch.no_grad():
                    teacher_logits = teacher(x)
                hint = F.mse_loss(getattr(net, PROJECTIONS)["0"](features["s"]).float(), features["t"].float())
                total = (1 - alpha) * task + alpha * kd_loss(logits, teacher_logits, temperature) + weight * hint
                (total * loss_scale / len(batches)).backward()
                ((1 - alpha) * F.cross_entropy(task_only(x).float(), y) * loss_scale / len(batches)).backward()
            for hook in hooks:
                hook.remove()
        expected = {n: p.grad / loss_scale for n, p in net.named_parameters()}
        assert relative_error(recorder.grads[step], expected) <= tolerance, step
        # the distillation terms matter: the task's gradient alone is far from it
        alone = {n: (p.grad / loss_scale if p.grad is not None else torch.zeros_like(p))
                 for n, p in task_only.named_parameters()}
        assert relative_error(alone, expected) > 0.1


def test_logged_kd_loss_is_the_first_steps_loss_by_hand(tmp_path):
    path = save_kit_teacher(tmp_path)
    recorder = Recorder()
    trainer, _ = fit([KnowledgeDistillation(path, temperature=2.0, alpha=0.5), recorder], log_every_n_steps=1)
    net = vit().model
    net.load_state_dict(recorder.start)
    x = recorder.batches[0][0][0]
    with torch.no_grad():
        expected = kd_loss(net(x), load_kit_network(path)(x), 2.0).item()
    assert trainer.callback_metrics["distill/kd_loss"].item() == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------------------------
# FLOPs: the teacher's forward is training compute
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("accumulate", [1, 2])
def test_flops_total_is_student_training_plus_teacher_forward(tmp_path, accumulate):
    path = save_kit_teacher(tmp_path, depth=3)  # a deeper teacher: its FLOPs differ from the student's
    monitor = FlopsMonitor()
    trainer, module = fit([KnowledgeDistillation(path), monitor], max_steps=3, accumulate_grad_batches=accumulate)
    x = next(iter(trainer.datamodule.train_dataloader()))[0]
    student = count_flops(lambda: module(x)).total
    with torch.no_grad():
        teacher = count_flops(lambda: load_kit_network(path)(x), backward=False).forward
    assert teacher > student / 3  # a forward of a model deeper than the student
    assert monitor.total_executed == 3 * accumulate * (student + teacher)
    assert monitor.total_effective == monitor.total_executed


def test_kd_composes_with_nm_sparsity_on_the_tiny_vit(tmp_path):
    """A 2:4 student distilled from its dense teacher: the masks stay exact, the teacher stays
    dense and untouched, distillation changes the run, and FLOPs add the dense teacher forward."""
    path = save_kit_teacher(tmp_path)
    results = {}
    for name in ("nm", "nm+kd"):
        nm, monitor = NMSparsity(n=2, m=4, method="srste", dense_steps=0), FlopsMonitor()
        kd = [KnowledgeDistillation(path, alpha=0.7, features={"blocks.?": "blocks.?"})] if name == "nm+kd" else []
        trainer, module = fit([nm, *kd, monitor], max_steps=3)
        results[name] = (trainer, module, nm, monitor)
        for layer_name, layer in nm.targets.items():
            assert (layer.weight.detach() != 0).reshape(-1, 4).sum(1).eq(2).all(), layer_name
    trainer, module, nm, monitor = results["nm+kd"]
    assert max_abs_diff(flat_state(module), flat_state(results["nm"][1])) > 1e-4
    teacher = load_kit_network(path)
    assert all(torch.equal(v, torch.load(path, weights_only=False)["state_dict"][f"model.{k}"])
               for k, v in teacher.state_dict().items())
    x = next(iter(trainer.datamodule.train_dataloader()))[0]
    with torch.no_grad():
        teacher_forward = count_flops(lambda: teacher(x), backward=False).forward
    student = results["nm"][3]
    assert monitor.total_executed == student.total_executed + 3 * teacher_forward
    masked = masked_layer_flops(nm, trainer, module)
    assert monitor.total_effective == pytest.approx(monitor.total_executed - 3 * 0.5 * masked, rel=1e-9)


# --------------------------------------------------------------------------------------------
# the teacher: frozen, in eval mode, with the student's device and dtype, in no state dict
# --------------------------------------------------------------------------------------------
class TeacherProbe(Callback):
    def __init__(self, kd):
        self.kd, self.seen = kd, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        teacher = self.kd.distiller.teacher
        trained = {id(p) for o in trainer.optimizers for g in o.param_groups for p in g["params"]}
        self.seen.append({
            "training": teacher.training,
            "grad": any(p.requires_grad or p.grad is not None for p in teacher.parameters()),
            "optimized": any(id(p) in trained for p in teacher.parameters()),
            "dtypes": {p.dtype for p in teacher.parameters()},
            "student_dtype": next(pl_module.parameters()).dtype,
            "in_state": len(pl_module.state_dict()) != len(vit().state_dict()),
        })


@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
def test_teacher_is_frozen_and_kept_out_of_the_students_state(tmp_path, precision):
    path = save_kit_teacher(tmp_path)
    kd = KnowledgeDistillation(path, features={"blocks.1": "blocks.1"})  # equal widths: no projection
    probe = TeacherProbe(kd)
    trainer, module = fit([kd, probe, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)], max_steps=2,
                          precision=precision, enable_checkpointing=True)
    for seen in probe.seen:
        assert not seen["training"] and not seen["grad"] and not seen["optimized"] and not seen["in_state"]
        assert seen["dtypes"] == {seen["student_dtype"]}
    assert probe.seen[0]["student_dtype"] == (torch.bfloat16 if precision == "bf16-true" else torch.float32)
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert checkpoint["state_dict"].keys() == vit().state_dict().keys()
    state = next(v for k, v in checkpoint["callbacks"].items() if k.startswith("KnowledgeDistillation"))
    assert state == {"last_step": 2, "teacher": path}
    # after fit: the hooks and the teacher are gone, the model is plain
    assert kd.distiller is None and not module.model._forward_hooks and not module.model._forward_pre_hooks
    assert not module.model.blocks[1]._forward_hooks


# --------------------------------------------------------------------------------------------
# feature projections: trained, checkpointed, resumed, removed
# --------------------------------------------------------------------------------------------
def gpt_fit(tmp_path, path, callbacks=(), **kwargs):
    kd = KnowledgeDistillation(path, alpha=0.5, features={"blocks.1": "blocks.2"})
    recorder = Recorder()
    trainer, module = fit([kd, recorder, *callbacks], module=gpt(), data=text(), **kwargs)
    return trainer, module, recorder


def test_projection_trains_resumes_exactly_and_leaves_with_teardown(tmp_path):
    path = save_kit_teacher(tmp_path, "gpt", n_layer=3, n_embd=48)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1, filename="{step}")
    trainer, module, recorder = gpt_fit(tmp_path, path, [saver], max_steps=4, enable_checkpointing=True)
    initial = recorder.start[f"{PROJECTIONS}.0.weight"]
    assert initial.shape == (48, 32) and not torch.equal(recorder.projection, initial)  # it trained
    assert f"model.{PROJECTIONS}.0.weight" in torch.load(tmp_path / "ckpt" / "step=2.ckpt",
                                                         weights_only=False)["state_dict"]
    assert not hasattr(module.model, PROJECTIONS)  # removed at teardown: a plain GPT
    assert module.state_dict().keys() == gpt().state_dict().keys()
    resumed_trainer, resumed, resumed_recorder = gpt_fit(tmp_path, path, max_steps=4,
                                                         ckpt_path=str(tmp_path / "ckpt" / "step=2.ckpt"))
    assert resumed_trainer.global_step == 4
    assert max_abs_diff(flat_state(resumed), flat_state(module)) <= 1e-6
    assert torch.allclose(resumed_recorder.projection, recorder.projection, atol=1e-6)


def test_projection_is_seeded_by_run_and_layer(tmp_path):
    path = save_kit_teacher(tmp_path, "gpt", n_layer=3, n_embd=48)
    starts = []
    for seed in ("0", "0", "1"):
        starts.append(gpt_fit(tmp_path, path, run_seed=seed)[2].start[f"{PROJECTIONS}.0.weight"])
    assert torch.equal(starts[0], starts[1]) and not torch.equal(starts[0], starts[2])


def test_ddp_spawn_returns_the_student_without_teacher_or_projection(tmp_path):
    path = save_kit_teacher(tmp_path, "gpt", n_layer=3, n_embd=48)
    seeded(0)
    module = gpt()
    kd = KnowledgeDistillation(path, features={"blocks.1": "blocks.2"})
    trainer = make_trainer(strategy="ddp_spawn", devices=2, max_steps=3, enable_checkpointing=True,
                           callbacks=[kd, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)])
    trainer.fit(module, datamodule=text())
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]
    student = {k: v for k, v in saved.items() if PROJECTIONS not in k}
    assert len(student) < len(saved)  # the checkpoint resumes the projection too
    assert module.state_dict().keys() == student.keys()
    assert max_abs_diff(module.state_dict(), student) == 0.0
    assert kd.distiller is None  # the main process never built a teacher


def test_an_optimizer_that_leaves_out_the_projections_is_refused(tmp_path):
    path = save_kit_teacher(tmp_path, "gpt", n_layer=3, n_embd=48)

    class BlocksOnly(type(gpt())):
        def configure_optimizers(self):
            return torch.optim.SGD(self.model.blocks.parameters(), lr=0.1)

    module = BlocksOnly(block_size=32, n_layer=2, n_head=2, n_embd=32)
    with pytest.raises(ValueError, match=r"KnowledgeDistillation \(trainer.callbacks\[0\]\): the optimizer of BlocksOnly "
                                         r"does not train the feature projections \(`kd_projections`"):
        fit([KnowledgeDistillation(path, features={"blocks.1": "blocks.2"})], module=module, data=text())


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"temperature": 0.0}, r"Expected `temperature` in \(0, inf\), got temperature=0.0"),
    ({"temperature": -1}, r"Expected `temperature` in \(0, inf\), got temperature=-1"),
    ({"alpha": 1.5}, r"Expected `alpha` in \[0, 1\], got alpha=1.5"),
    ({"alpha": -0.1}, r"Expected `alpha` in \[0, 1\], got alpha=-0.1"),
    ({"alpha": 0.0}, r"Expected `alpha` > 0 or `features` with `feature_weight` > 0, got alpha=0"),
    ({"feature_weight": -1.0}, r"Expected `feature_weight` in \[0, inf\), got feature_weight=-1.0"),
    ({"features": ["blocks.1"]}, r"Expected `features` to map student layer names to teacher layer names"),
    ({"teacher": None}, r"Expected `teacher` to be the path of a checkpoint file, got teacher=None"),
    ({"teacher_kwargs": [1]}, r"Expected `teacher_kwargs` to be a mapping of arguments, got teacher_kwargs=\[1\]"),
])
def test_bad_arguments_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KnowledgeDistillation(**{"teacher": "teacher.ckpt", **kwargs})


def test_bad_teachers_and_layers_are_refused_before_training(tmp_path):
    class NoSteps(Callback):
        def on_train_batch_start(self, *args):
            raise AssertionError("training started")

    def refused(message, **kwargs):
        with pytest.raises(ValueError, match=message):
            fit([KnowledgeDistillation(**kwargs), NoSteps()])

    refused(r"Expected `teacher` to be a checkpoint file, got teacher='.*missing.ckpt' \(no such file\)",
            teacher=str(tmp_path / "missing.ckpt"))
    (tmp_path / "broken.ckpt").write_bytes(b"\x00" * 64)
    refused(r"Could not read `teacher`='.*broken.ckpt' as a checkpoint", teacher=str(tmp_path / "broken.ckpt"))
    five = save_kit_teacher(tmp_path, name="five.ckpt")
    checkpoint = torch.load(five, weights_only=False)
    torch.manual_seed(0)
    other = type(vit())(num_classes=5, in_chans=1, model_kwargs=checkpoint["hyper_parameters"]["model_kwargs"])
    torch.save({"state_dict": other.state_dict(), "hyper_parameters": dict(other.hparams)}, five)
    refused(r"The teacher's output width 5 differs from the student's 10 \(VisionTransformer from teacher='.*five.ckpt'\)",
            teacher=five)
    path = save_kit_teacher(tmp_path)
    refused(r"`features` 'layer4': 'layer4' matches no student layer of VisionTransformer; its layers: patch_embed",
            teacher=path, features={"layer4": "blocks.1"})
    # one teacher per run (each would rescale the task's gradient): Lightning refuses a second instance
    with pytest.raises(RuntimeError, match=r"more than one stateful callback of type `KnowledgeDistillation`"):
        fit([KnowledgeDistillation(path), KnowledgeDistillation(path), NoSteps()])


def test_resuming_with_another_teacher_warns():
    kd = KnowledgeDistillation("b.ckpt")
    with pytest.warns(UserWarning, match=r"resuming a run distilled from teacher='a.ckpt' with teacher='b.ckpt'"):
        kd.load_state_dict({"last_step": 3, "teacher": "a.ckpt"})
    assert kd.state_dict() == {"last_step": 3, "teacher": "b.ckpt"}


def test_compiled_step_reads_the_current_gradient_scale(tmp_path):
    """Under torch.compile the distillation gradient's scale is read from a tensor updated in
    place: when accumulation goes from 1 to 2 micro-batches (epoch 1), compiled equals eager."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    path = save_kit_teacher(tmp_path)
    states = []
    for compiled in (False, True):
        torch._dynamo.reset()
        seeded(0)
        module = vit()
        trainer = make_trainer(max_steps=8, callbacks=[KnowledgeDistillation(path, alpha=0.8),
                                                       GradientAccumulationScheduler({0: 1, 1: 2})])
        trainer.fit(torch.compile(module, backend="aot_eager") if compiled else module, datamodule=digits())
        assert trainer.accumulate_grad_batches == 2
        states.append(flat_state(module))
    torch._dynamo.reset()
    assert max_abs_diff(states[0], states[1]) <= 1e-5
