"""TaskAwareMasking in training: when the masks move, with what, and at which sparsity."""

from __future__ import annotations

from lit_eff import sparsity
from lit_eff.callbacks import TaskAwareMasking
from lit_eff.datamodules import SeqDigitsDataModule
from tests.helpers import make_trainer, seeded, tiny_vit


def test_updates_restart_with_every_task_and_use_the_last_batch_gradient(monkeypatch):
    seeded(0)
    technique = TaskAwareMasking(sparsity=0.5, lower=[0.5, 0.6], upper=[0.4, 0.5], boundaries=[2],
                                 update_every_epochs=2)
    calls = []
    update = technique._update

    def spy(trainer, epoch_in_task):
        calls.append((trainer.current_epoch, epoch_in_task, sorted(technique._grads)))
        update(trainer, epoch_in_task)
        calls[-1] += tuple([int((~sparsity.get_mask(m)).sum()) / sparsity.get_mask(m).numel()
                            for m in technique.targets.values()][:1])

    monkeypatch.setattr(technique, "_update", spy)
    trainer = make_trainer(max_epochs=6, limit_train_batches=2, callbacks=[technique])
    trainer.fit(tiny_vit(), datamodule=SeqDigitsDataModule(batch_size=32, epochs_per_task=3))
    # 3 epochs per task, an update every 2 epochs of a task: epochs 0 and 2 of each task
    assert [(epoch, in_task) for epoch, in_task, *_ in calls] == [(0, 0), (2, 2), (3, 0), (5, 2)]
    names = sorted(technique.targets)
    assert calls[0][2] == [] and all(grads == names for _, _, grads, _ in calls[1:])  # no gradient before training
    # task epochs 0-1 regrow to 40% sparsity, from task epoch 2 on to 50% (one boundary at 2)
    assert [round(s, 2) for *_, s in calls] == [0.4, 0.5, 0.4, 0.5]


def test_sparcl_parts_compose_with_replay():
    """Task-aware masking, dynamic data removal and gradient masking with DER++ replay on Seq-digits."""
    from lit_eff.callbacks import DynamicDataRemoval, GradientMasking, Replay

    seeded(0)
    tdm = TaskAwareMasking(sparsity=0.75, boundaries=[1, 3], update_every_epochs=1)
    removal = DynamicDataRemoval(remove_fraction=0.2, every_n_epochs=1, until_epoch=2)
    grad_mask = GradientMasking(density=0.2, refresh_every=4)
    trainer = make_trainer(max_epochs=8, callbacks=[Replay(buffer_size=64), tdm, removal, grad_mask])
    trainer.fit(tiny_vit(), datamodule=SeqDigitsDataModule(batch_size=16, epochs_per_task=4))
    assert sorted(removal.removed) == [1, 2, 5, 6]  # epochs 1 and 2 of each task
    for module in tdm.targets.values():  # the last update (task epoch 3) pruned to 75% without regrowth
        mask = sparsity.get_mask(module)
        assert 0.75 <= float((~mask).float().mean()) <= 0.76
    assert grad_mask.patterns.keys() == tdm.targets.keys()  # gradients masked among the weights TDM keeps
