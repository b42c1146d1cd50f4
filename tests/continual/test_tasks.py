"""Seq-digits: task-split training samples, evaluation over seen classes, per-task accuracy, and
DER++ replay's loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lit_eff.callbacks import Replay
from lit_eff.continual import ReservoirBuffer, TaskSplit, task_position
from lit_eff.datamodules import SeqDigitsDataModule
from tests.helpers import fit, make_trainer, seeded, tiny_vit


def test_each_epoch_draws_from_its_task():
    data = SeqDigitsDataModule(batch_size=16, epochs_per_task=2)
    data.setup("fit")
    labels = data.train_data[1]
    for epoch in range(10):
        chosen = data.train_samples(epoch)
        assert set(labels[chosen].tolist()) == {2 * (epoch // 2), 2 * (epoch // 2) + 1}
        assert len(chosen) == int(torch.isin(labels, torch.tensor(data.task_split.classes(epoch // 2))).sum())
    split = data.task_split
    assert (split.num_tasks, split.task_of(5), split.epoch_in_task(5), split.seen_classes(1)) == (5, 2, 1, [0, 1, 2, 3])


def test_fit_trains_task_by_task_and_logs_per_task_accuracy():
    seeded(0)
    model, data = tiny_vit(), SeqDigitsDataModule(batch_size=32, epochs_per_task=1)
    seen = []

    from lightning.pytorch import Callback

    class Spy(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((trainer.current_epoch, task_position(trainer), set(batch[1].tolist())))

    trainer = make_trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=None, callbacks=[Spy()])
    trainer.fit(model, datamodule=data)
    assert trainer.reload_dataloaders_every_n_epochs == 1
    assert [(e, pos) for e, pos, _ in seen] == [(0, (0, 0))] * 2 + [(1, (1, 0))] * 2
    assert all(labels <= ({0, 1} if epoch == 0 else {2, 3}) for epoch, _, labels in seen)
    metrics = trainer.callback_metrics
    # validation after task 1 covers classes 0-3: accuracy per task and their mean
    assert "val/acc_task0" in metrics and "val/acc_task1" in metrics and "val/acc_task2" not in metrics
    assert float(metrics["val/acc_avg"]) == pytest.approx((float(metrics["val/acc_task0"])
                                                           + float(metrics["val/acc_task1"])) / 2)
    trainer.test(model, datamodule=data, verbose=False)
    assert all(f"test/acc_task{t}" in trainer.callback_metrics for t in range(5))  # test: every class


def test_replay_loss_is_der_plus_plus():
    """The gradient with Replay's hook equals that of CE(current task's logits) + alpha·MSE(buffer
    logits) + beta·CE(buffer labels), each buffer term on its own draw."""
    torch.manual_seed(0)
    net = torch.nn.Linear(6, 10)
    x, y = torch.randn(4, 6), torch.tensor([2, 3, 3, 2])
    replay = Replay(buffer_size=16, alpha=0.1, beta=0.5)
    replay.split, replay._grad_scale = TaskSplit(10, 2, 1), torch.ones(())
    replay.buffer.add(torch.randn(9, 6), torch.randint(0, 2, (9,)), torch.randn(9, 10), torch.Generator())
    replay._labels, replay._armed, replay._offsets = y, True, (1, None)
    replay._draws = (torch.Generator().manual_seed(1), torch.Generator().manual_seed(2))
    handle = net.register_forward_hook(replay._forward)
    F.cross_entropy(net(x), y).backward()
    handle.remove()
    ours = net.weight.grad.clone()
    net.zero_grad()
    mask = torch.full((10,), float("-inf"))
    mask[[2, 3]] = 0
    x1, _, z1 = replay.buffer.sample(4, torch.Generator().manual_seed(1))
    x2, y2, _ = replay.buffer.sample(4, torch.Generator().manual_seed(2))
    loss = F.cross_entropy(net(x) + mask, y) + 0.1 * F.mse_loss(net(x1), z1) + 0.5 * F.cross_entropy(net(x2), y2)
    loss.backward()
    assert torch.allclose(ours, net.weight.grad, atol=1e-6)
    assert not torch.allclose(ours, torch.autograd.grad(F.cross_entropy(net(x) + mask, y), net.weight)[0], atol=1e-4)


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"`classes_per_task` to divide the 10 classes.*got classes_per_task=3"):
        SeqDigitsDataModule(classes_per_task=3)
    with pytest.raises(ValueError, match=r"`epochs_per_task` to be an integer >= 1, got epochs_per_task=0"):
        SeqDigitsDataModule(epochs_per_task=0)
    with pytest.raises(ValueError, match=r"`buffer_size` to be an integer >= 1, got buffer_size=0"):
        Replay(buffer_size=0)
    with pytest.raises(ValueError, match=r"`alpha`.*got alpha=-0.1"):
        Replay(alpha=-0.1)
    with pytest.raises(ValueError, match=r"trainer.max_epochs <= 5 \(5 tasks x epochs_per_task=1\), got max_epochs=6"):
        make_trainer(max_epochs=6).fit(tiny_vit(), datamodule=SeqDigitsDataModule(epochs_per_task=1))
    with pytest.raises(ValueError, match=r"Replay replays past tasks, so it needs a datamodule that splits classes"):
        fit([Replay()])


def test_data_removal_restarts_with_every_task():
    """On a task-split datamodule DynamicDataRemoval's schedule counts each task's epochs from 0 and
    removes a share of the task's samples, among them only."""
    from lit_eff.callbacks import DynamicDataRemoval

    seeded(0)
    data = SeqDigitsDataModule(batch_size=32, epochs_per_task=2)
    removal = DynamicDataRemoval(remove_fraction=0.2, every_n_epochs=1, until_epoch=1)
    trainer = make_trainer(max_epochs=4, limit_train_batches=None, callbacks=[removal])
    trainer.fit(tiny_vit(), datamodule=data)
    assert sorted(removal.removed) == [1, 3]  # epoch 1 of task 0, epoch 1 of task 1
    for epoch, removed in removal.removed.items():
        task_samples = data.epoch_train_samples(epoch)
        assert len(removed) == int(0.2 * len(task_samples)) and set(removed.tolist()) <= set(task_samples.tolist())
        assert len(data.train_samples(epoch)) == len(task_samples) - len(removed)
    assert removal._never_learned == 2  # a never-learned sample counts the task's epochs


def test_replay_refuses_label_smoothing_with_the_class_mask():
    data = SeqDigitsDataModule(epochs_per_task=1)
    with pytest.raises(ValueError, match=r"label smoothing would put probability on them.*got 0.1\)"):
        make_trainer(max_epochs=1, callbacks=[Replay()]).fit(tiny_vit(label_smoothing=0.1), datamodule=data)
