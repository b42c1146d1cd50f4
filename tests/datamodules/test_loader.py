import itertools

import torch

from lit_eff.datamodules import ResumableLoader


def batches(loader, n=None):
    """The first ``n`` batches (all if None), taking no batch beyond them from the loader."""
    return [x.clone() for (x,) in itertools.islice(loader, n)]


def test_order_is_a_seeded_permutation_per_epoch():
    data = (torch.arange(20),)
    a = ResumableLoader(data, 4, shuffle=True, seed=3)
    b = ResumableLoader(data, 4, shuffle=True, seed=3)
    first, second = batches(a), batches(a)
    assert torch.equal(torch.cat(first).sort().values, torch.arange(20))
    assert not torch.equal(torch.cat(first), torch.cat(second)), "each epoch must reshuffle"
    assert all(torch.equal(x, y) for x, y in zip(first, batches(b)))
    assert not torch.equal(torch.cat(first), torch.cat(batches(ResumableLoader(data, 4, shuffle=True, seed=4))))


def test_restored_state_continues_mid_epoch_exactly():
    data = (torch.arange(30),)
    uninterrupted = ResumableLoader(data, 4, shuffle=True, drop_last=True, seed=0)
    reference = batches(uninterrupted) + batches(uninterrupted)
    stopped = ResumableLoader(data, 4, shuffle=True, drop_last=True, seed=0)
    seen = batches(stopped) + batches(stopped, n=3)
    state = stopped.state_dict()
    assert state["epoch"] == 1 and state["consumed"] == 3
    resumed = ResumableLoader(data, 4, shuffle=True, drop_last=True, seed=0)
    resumed.load_state_dict(state)
    seen += batches(resumed)
    assert len(seen) == len(reference) == 14
    assert all(torch.equal(x, y) for x, y in zip(seen, reference))


def test_set_epoch_starts_that_epoch_and_keeps_a_restored_position():
    data = (torch.arange(16),)
    loader = ResumableLoader(data, 4, shuffle=True, seed=0)
    epoch2 = ResumableLoader(data, 4, shuffle=True, seed=0)
    epoch2.set_epoch(2)
    loader.load_state_dict({"epoch": 2, "consumed": 1})
    loader.set_epoch(2)  # Lightning announces the restored epoch: position kept
    assert all(torch.equal(x, y) for x, y in zip(batches(loader), batches(epoch2)[1:]))
    loader.load_state_dict({"epoch": 2, "consumed": 4})
    loader.set_epoch(3)  # restored at an epoch boundary: the next epoch starts from its first batch
    fresh = ResumableLoader(data, 4, shuffle=True, seed=0)
    fresh.set_epoch(3)
    assert all(torch.equal(x, y) for x, y in zip(batches(loader), batches(fresh)))


def test_ranks_split_every_epoch_without_overlap():
    data = (torch.arange(22),)
    ranks = []
    for rank in range(2):
        loader = ResumableLoader(data, 4, shuffle=True, seed=0)
        loader.set_distributed(2, rank)
        ranks.append(torch.cat(batches(loader)))
    assert len(ranks[0]) == len(ranks[1]) == 11
    assert set(torch.cat(ranks).tolist()) == set(range(22))
    assert not set(ranks[0].tolist()) & set(ranks[1].tolist())


def test_eval_loader_restarts_every_iteration_and_transform_is_seeded():
    data = (torch.arange(10).float(),)
    noise = lambda batch, gen: (batch[0] + torch.rand(len(batch[0]), generator=gen),)  # noqa: E731
    loader = ResumableLoader(data, 4, transform=noise, resumable=False, seed=1)
    partial = batches(loader, n=1)
    full, again = batches(loader), batches(loader)
    assert torch.equal(partial[0], full[0])
    assert all(torch.equal(x, y) for x, y in zip(full, again))
    assert not torch.equal(full[0], torch.arange(4).float())


def test_map_style_dataset_goes_through_worker_loader():
    dataset = torch.utils.data.TensorDataset(torch.arange(12))
    loader = ResumableLoader(dataset, 5, shuffle=True, seed=0, num_workers=1)
    tensors = ResumableLoader((torch.arange(12),), 5, shuffle=True, seed=0)
    got = [b[0] for b in loader]
    assert [len(b) for b in got] == [5, 5, 2]
    assert all(torch.equal(x, y) for x, y in zip(got, batches(tensors)))


def test_eval_ranks_visit_every_sample_once_in_equal_batch_counts():
    # 359 test images on two ranks: 180 + 179, not 180 + 180 with one image twice
    for n, batch_size, world in [(359, 32, 2), (22, 4, 3), (65, 32, 2), (7, 1, 2)]:
        data = (torch.arange(n),)
        ranks = []
        for rank in range(world):
            loader = ResumableLoader(data, batch_size, resumable=False)
            loader.set_distributed(world, rank)
            ranks.append(batches(loader))
        counts = {len(r) for r in ranks}
        assert len(counts) == 1, f"ranks must run the same number of batches: {[len(r) for r in ranks]}"
        assert all(len(b) > 0 and len(b) <= batch_size for r in ranks for b in r)
        seen = torch.cat([b for r in ranks for b in r]).tolist()
        if n // world >= counts.pop():
            assert sorted(seen) == list(range(n)), (n, batch_size, world)
        else:  # fewer samples per rank than batches (batch_size 1): padded as training is
            assert set(seen) == set(range(n)) and len(seen) == world * -(-n // world)
