"""DynamicDataRemoval: forgetting statistics and removal order against a re-derivation of
SparCL's official code, shrinking epochs (FlopsMonitor's executed FLOPs per epoch fall), exact
mid-epoch resume after a removal, the datamodule's sample sets, errors. (Two-process DDP and
FSDP2: the contract table.)"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_eff.callbacks import DynamicDataRemoval, FlopsMonitor
from lit_eff.data import RemovalSchedule, SampleStats, removal_order
from lit_eff.datamodules import SyntheticImageDataModule, TextDataModule
from lit_eff.datamodules.loader import ResumableLoader
from lit_eff.flops import count_flops
from lit_eff.validation import stepping_batches
from tests.helpers import digits, flat_state, make_trainer, max_abs_diff, seeded, tiny_gpt, tiny_vit


# --------------------------------------------------------------------------------------------
# the official algorithm (neu-spiral/SparCL), re-derived: forgetting counts over each sample's
# presentations, never-learned samples count as the epochs of the task, ascending order
# --------------------------------------------------------------------------------------------
def official_counts(history: dict[int, list[int]], npresentations: int) -> dict[int, int]:
    counts = {}
    for index, accs in history.items():
        acc = np.array(accs[:npresentations])
        transitions = acc[1:] - acc[:-1]
        learned = len(np.where(acc == 1)[0]) > 0
        counts[index] = len(np.where(transitions == -1)[0]) if learned else npresentations
    return counts


def official_per_removal(remove_n: int, remove_data_epoch: int, freq: int) -> int:
    return int(remove_n / (int(remove_data_epoch) / freq))


def test_forgetting_counts_and_removal_order_match_the_official_code():
    gen = torch.Generator().manual_seed(0)
    stats, history = SampleStats(40), {}
    skill = torch.linspace(-0.2, 1.2, 40)  # some samples are never, some always classified correctly
    for _ in range(6):  # epochs; each leaves a few samples out (the official loop skips a short last batch)
        presented = torch.randperm(40, generator=gen)[:34]
        correct = torch.rand(34, generator=gen) < skill[presented]
        stats.update(presented, correct, torch.zeros(34))
        for index, c in zip(presented.tolist(), correct.tolist()):
            history.setdefault(index, []).append(int(c))
    expected = official_counts(history, npresentations=50)
    counts = stats.forgetting_counts(never_learned=50)
    assert {i: int(counts[i]) for i in history} == expected
    assert all(int(counts[i]) == 0 for i in range(40) if i not in history)
    candidates = torch.tensor(sorted(history))
    order = removal_order(counts.float(), candidates, torch.Generator().manual_seed(1))
    assert sorted(order.tolist()) == candidates.tolist()
    # ascending counts (ties in any order), as np.argsort on the official list
    assert [expected[i] for i in order.tolist()] == sorted(expected.values())
    assert max(expected.values()) == 50 and min(expected.values()) == 0  # both ends are exercised


@pytest.mark.parametrize("fraction,freq,until", [(0.3, 5, 20), (0.25, 3, 10), (0.5, 1, 1), (0.1, 2, 7)])
def test_schedule_matches_the_official_epochs_and_counts(fraction, freq, until):
    schedule, n = RemovalSchedule(fraction, freq, until), 10000
    assert schedule.epochs() == [e for e in range(60) if e > 0 and e % freq == 0 and e <= until]
    assert schedule.per_removal(n) == official_per_removal(int(fraction * n), until, freq)


def test_mean_loss_averages_each_samples_presentations():
    stats = SampleStats(3)
    stats.update(torch.tensor([0, 1]), torch.tensor([True, False]), torch.tensor([1.0, 4.0]))
    stats.update(torch.tensor([0, 2]), torch.tensor([True, True]), torch.tensor([3.0, 5.0]))
    assert stats.mean_loss().tolist() == [2.0, 4.0, 5.0]


# --------------------------------------------------------------------------------------------
# the loader's sample sets
# --------------------------------------------------------------------------------------------
def test_loader_draws_each_epoch_from_its_sample_set_and_ranks_split_it():
    data = (torch.arange(20),)
    sets = {0: None, 1: torch.arange(0, 20, 2)}
    single = ResumableLoader(data, 2, shuffle=True, drop_last=True, samples=sets.get)
    assert len(single) == 10 and sorted(single.epoch_indices(0).tolist()) == list(range(20))
    single.set_epoch(1)
    assert len(single) == 5 and sorted(torch.cat([b[0] for b in single]).tolist()) == list(range(0, 20, 2))
    ranks = [ResumableLoader(data, 5, shuffle=True, drop_last=True, samples=sets.get) for _ in range(2)]
    for rank, loader in enumerate(ranks):
        loader.set_distributed(2, rank)
    assert sorted(torch.cat([r.epoch_indices(1) for r in ranks]).tolist()) == list(range(0, 20, 2))
    assert single.batch_indices(3, epoch=1).tolist() == single.epoch_batches(1)[3].tolist()


class TaskSplit(SyntheticImageDataModule):
    """Two tasks: epochs 0-1 draw the first half of the training split, epochs 2-3 the second."""

    def epoch_train_samples(self, epoch):
        half = self.num_train_samples // 2
        return torch.arange(half) if epoch < 2 else torch.arange(half, self.num_train_samples)


def test_datamodule_sample_sets_removals_and_their_state():
    data = TaskSplit(image_size=4, in_chans=1, num_samples=20, batch_size=2)
    data.setup("fit")
    data.remove_train_samples(torch.tensor([1, 3, 15]), from_epoch=1)
    assert data.train_samples(0).tolist() == list(range(10))
    assert data.train_samples(1).tolist() == [0, 2, 4, 5, 6, 7, 8, 9]
    assert data.train_samples(2).tolist() == [10, 11, 12, 13, 14, 16, 17, 18, 19]
    data.plan_removals({1: 3})
    trainer = SimpleNamespace(max_epochs=3, max_steps=-1, world_size=1, limit_train_batches=1.0,
                              accumulate_grad_batches=1)
    # 10, 7 and 10 samples in batches of 2 (last dropped): a removal planned in one subset leaves another alone
    assert data.planned_steps(trainer) == 5 + 3 + 5
    restored = TaskSplit(image_size=4, in_chans=1, num_samples=20, batch_size=2)
    restored.setup("fit")
    restored.load_state_dict(data.state_dict())
    assert restored.train_samples(2).tolist() == data.train_samples(2).tolist()
    with pytest.raises(ValueError, match=r"indices in \[0, 20\), got min=0, max=20"):
        data.remove_train_samples(torch.tensor([0, 20]), from_epoch=1)


# --------------------------------------------------------------------------------------------
# a run: epochs shrink, executed FLOPs per epoch fall, the lowest-forgetting samples go, resume
# --------------------------------------------------------------------------------------------
class Recorder(Callback):
    """Per step: the batch's dataset indices and whether the model classified each sample
    correctly (its own forward hook); per epoch: batches and FlopsMonitor's executed FLOPs."""

    def __init__(self):
        self.steps, self.epochs, self._spent = [], [], 0.0

    def on_train_start(self, trainer, pl_module):
        self._hook = pl_module.register_forward_hook(lambda m, a, out: setattr(self, "_logits", out.detach()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        indices = trainer.datamodule.train_loader.batch_indices(batch_idx)
        self.steps.append((trainer.current_epoch, indices.clone(), (self._logits.argmax(-1) == batch[1]).long()))

    def on_train_epoch_end(self, trainer, pl_module):
        monitor = next(cb for cb in trainer.callbacks if isinstance(cb, FlopsMonitor))
        self.epochs.append((trainer.num_training_batches, monitor.total_executed - self._spent))
        self._spent = monitor.total_executed

    def on_train_end(self, trainer, pl_module):
        self._hook.remove()


def run(tmp_path, ckpt_path=None, **kwargs):
    seeded(0)
    model, data = tiny_vit(), digits(batch_size=128)  # 1258 training samples: 9 batches per epoch
    technique, recorder = DynamicDataRemoval(remove_fraction=0.5, every_n_epochs=2, until_epoch=2), Recorder()
    callbacks = [FlopsMonitor(), technique, recorder,
                 ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=20, save_top_k=-1, filename="{step}")]
    trainer = make_trainer(callbacks=callbacks, max_epochs=4, limit_train_batches=None, enable_checkpointing=True,
                           **kwargs)
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return trainer, model, technique, recorder


def test_removal_shrinks_epochs_and_resume_after_it_is_exact(tmp_path):
    trainer, model, technique, recorder = run(tmp_path / "full")
    data = trainer.datamodule
    # 629 samples go before epoch 2: 629 left, 4 batches of 128
    removed = technique.removed[2]
    assert len(removed) == int(0.5 * data.num_train_samples) == 629
    assert [batches for batches, _ in recorder.epochs] == [9, 9, 4, 4]
    batch = next(iter(data.train_dataloader()))
    per_step = count_flops(lambda: model(batch[0])).total
    assert [flops for _, flops in recorder.epochs] == [9 * per_step, 9 * per_step, 4 * per_step, 4 * per_step]
    # the learning-rate schedule was sized on the steps the run takes, not on 4 epochs of 9 batches
    assert stepping_batches(trainer) == trainer.global_step == 26 < 4 * 9
    assert trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)
    # the removed samples are those with the fewest forgetting events over epochs 0-1 (official counting)
    history: dict[int, list[int]] = {}
    for epoch, indices, correct in recorder.steps:
        if epoch < 2:
            for i, c in zip(indices.tolist(), correct.tolist()):
                history.setdefault(i, []).append(c)
    counts = official_counts(history, npresentations=4)
    kept = [i for i in history if i not in set(removed.tolist())]
    assert set(removed.tolist()) <= set(history)
    assert max(counts[i] for i in removed.tolist()) <= min(counts[i] for i in kept)
    assert len({counts[i] for i in history}) > 1  # the ranking was not all ties
    later = torch.cat([indices for epoch, indices, _ in recorder.steps if epoch >= 2])
    assert not set(later.tolist()) & set(removed.tolist())
    assert set(later.tolist()) <= set(data.train_samples(2).tolist())

    # resume mid-epoch 2 (step 20 = batch 2 of 4 after the removal): the same run
    resumed, resumed_model, resumed_technique, resumed_recorder = run(tmp_path / "again",
                                                                      ckpt_path=str(tmp_path / "full" / "step=20.ckpt"))
    assert resumed.global_step == trainer.global_step == 26
    assert max_abs_diff(flat_state(resumed_model), flat_state(model)) <= 1e-6
    assert torch.equal(resumed_technique.removed[2], removed)
    for name, value in technique.stats.state_dict().items():
        assert torch.allclose(resumed_technique.stats.state_dict()[name], value), name
    assert [s[1].tolist() for s in resumed_recorder.steps] == [s[1].tolist() for s in recorder.steps[20:]]
    assert resumed.datamodule.train_samples(3).tolist() == data.train_samples(3).tolist()
    monitors = [next(cb for cb in t.callbacks if isinstance(cb, FlopsMonitor)) for t in (resumed, trainer)]
    assert monitors[0].total_executed == monitors[1].total_executed


# --------------------------------------------------------------------------------------------
# errors, before any work
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    ({"remove_fraction": 0.0}, r"remove_fraction.*0\.0"),
    ({"remove_fraction": 1.5}, r"remove_fraction.*1\.5"),
    ({"every_n_epochs": 0}, r"every_n_epochs.*0"),
    ({"every_n_epochs": 5, "until_epoch": 3}, r"until_epoch.*>= `every_n_epochs`.*until_epoch=3, every_n_epochs=5"),
    ({"score": "margin"}, r"`score` in \['forgetting', 'loss'\], got score='margin'"),
])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DynamicDataRemoval(**kwargs)


def fit_refused(technique, model=None, data=None, **trainer_kwargs):
    seeded(0)
    trainer = make_trainer(callbacks=[technique], max_steps=2, **trainer_kwargs)
    trainer.fit(model or tiny_vit(), datamodule=data or digits())


def test_setups_it_cannot_run_are_refused_before_training():
    with pytest.raises(ValueError, match=r"reload_dataloaders_every_n_epochs 0 or 1, got 2"):
        fit_refused(DynamicDataRemoval(), reload_dataloaders_every_n_epochs=2)
    with pytest.raises(ValueError, match=r"one class label per sample; TextDataModule holds 2 tensors"):
        fit_refused(DynamicDataRemoval(), model=tiny_gpt(), data=TextDataModule(block_size=32, batch_size=8))
    with pytest.raises(ValueError, match=r"leaves 2 of 1258.*batch_size=32.*Lower `remove_fraction`"):
        fit_refused(DynamicDataRemoval(remove_fraction=0.999, every_n_epochs=1, until_epoch=1))
    seeded(0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 1, 8, 8),
                                                                        torch.zeros(4, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"needs a kit datamodule.*got dataloaders passed to fit"):
        make_trainer(callbacks=[DynamicDataRemoval()], max_steps=1).fit(tiny_vit(), train_dataloaders=loader)
