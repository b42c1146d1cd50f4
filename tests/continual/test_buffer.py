"""The reservoir replay buffer: reservoir sampling's rule, sampling, state."""

from __future__ import annotations

import pytest
import torch

from lit_eff.continual import ReservoirBuffer


def batch(start: int, n: int = 8):
    ids = torch.arange(start, start + n)
    return ids.float().view(n, 1).expand(n, 3).clone(), ids % 10, ids.float().view(n, 1).expand(n, 4).clone()


def test_fills_in_order_then_replaces_by_the_reservoir_rule():
    buffer = ReservoirBuffer(12)
    buffer.add(*batch(0), torch.Generator().manual_seed(0))
    assert len(buffer) == 8 and buffer.examples[:8, 0].tolist() == list(range(8))  # the first ones fill slots in order
    buffer.add(*batch(8), torch.Generator().manual_seed(1))
    assert buffer.num_seen == 16 and len(buffer) == 12
    # the rest: the n-th example (n = 12, 13, ...) draws j = randint(0, n) and takes slot j if j < 12
    gen, expected = torch.Generator().manual_seed(1), list(range(12))
    for n in range(12, 16):
        j = int(torch.randint(0, n + 1, (1,), generator=gen))
        if j < 12:
            expected[j] = n
    assert buffer.examples[:, 0].tolist() == expected
    assert torch.equal(buffer.labels, torch.tensor(expected) % 10)  # triples stay together
    assert buffer.logits[:, 3].tolist() == expected


def test_every_example_equally_likely_to_stay():
    kept = torch.zeros(200)
    for seed in range(300):
        buffer = ReservoirBuffer(20)
        for start in range(0, 200, 10):
            buffer.add(*batch(start, 10), torch.Generator().manual_seed(seed * 1000 + start))
        kept[buffer.examples[:, 0].long()] += 1
    rate = kept / 300  # 20/200 = 0.1 for every example, early or late
    assert rate[:100].mean() == pytest.approx(0.1, abs=0.015) and rate[100:].mean() == pytest.approx(0.1, abs=0.015)


def test_sample_and_state_round_trip():
    buffer = ReservoirBuffer(10)
    buffer.add(*batch(0, 6), torch.Generator().manual_seed(0))
    examples, labels, logits = buffer.sample(8, torch.Generator().manual_seed(3))
    assert len(examples) == 6 and len(set(examples[:, 0].tolist())) == 6  # at most what it holds, no repeats
    restored = ReservoirBuffer(10)
    restored.load_state_dict(buffer.state_dict())
    assert restored.num_seen == 6 and torch.equal(restored.examples, buffer.examples)
    with pytest.raises(ValueError, match=r"holds 10 examples, this one buffer_size=5"):
        ReservoirBuffer(5).load_state_dict(buffer.state_dict())
    with pytest.raises(ValueError, match="non-empty buffer"):
        ReservoirBuffer(3).sample(2, torch.Generator())
