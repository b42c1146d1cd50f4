"""Per-sample learning statistics and the order in which dynamic data removal drops samples.

A *forgetting event* (Toneva et al., ICLR 2019) is a presentation at which a sample is
misclassified after being classified correctly at its previous presentation. SparCL ranks the
samples presented since the last removal by their number of forgetting events, a sample never
classified correctly counting as the run's number of epochs, and removes the lowest first: the
samples learned once and never forgotten. The ``"loss"`` score ranks by the mean training loss
over the same presentations instead.

>>> stats = SampleStats(4)
>>> for correct in ([1, 1, 0, 0], [0, 1, 0, 1], [1, 1, 0, 0]):
...     stats.update(torch.arange(4), torch.tensor(correct, dtype=torch.bool), torch.zeros(4))
>>> stats.forgetting_counts(never_learned=9).tolist()
[1, 0, 9, 1]
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["SampleStats", "removal_order"]

_FIELDS = ("forgotten", "last_correct", "learned", "presented", "loss_sum")


class SampleStats:
    """Statistics of every training sample over its presentations since the last :meth:`reset`."""

    def __init__(self, num_samples: int, device: torch.device | str = "cpu") -> None:
        self.num_samples = int(num_samples)
        self.forgotten = torch.zeros(num_samples, dtype=torch.int32, device=device)  # forgetting events
        self.last_correct = torch.zeros(num_samples, dtype=torch.bool, device=device)
        self.learned = torch.zeros(num_samples, dtype=torch.bool, device=device)  # ever correct
        self.presented = torch.zeros(num_samples, dtype=torch.int32, device=device)  # presentations
        self.loss_sum = torch.zeros(num_samples, dtype=torch.float32, device=device)

    def to(self, device: torch.device | str) -> SampleStats:
        for name in _FIELDS:
            setattr(self, name, getattr(self, name).to(device))
        return self

    @torch.no_grad()
    def update(self, indices: torch.Tensor, correct: torch.Tensor, loss: torch.Tensor) -> None:
        """One presentation of each sample ``indices`` (no index twice): whether it was classified
        correctly and its loss. Runs on the device, without a sync."""
        indices = indices.to(self.forgotten.device)
        correct = correct.to(self.forgotten.device)
        self.forgotten[indices] += (self.last_correct[indices] & ~correct).to(torch.int32)
        self.last_correct[indices] = correct
        self.learned[indices] |= correct
        self.presented[indices] += 1
        self.loss_sum[indices] += loss.to(self.loss_sum)

    def reset(self) -> None:
        for name in _FIELDS:
            getattr(self, name).zero_()

    def forgetting_counts(self, never_learned: int) -> torch.Tensor:
        """Forgetting events per sample; ``never_learned`` for a presented sample never classified
        correctly (0 for samples not presented)."""
        counts = torch.where(self.learned, self.forgotten, torch.full_like(self.forgotten, never_learned))
        return torch.where(self.presented > 0, counts, torch.zeros_like(counts))

    def mean_loss(self) -> torch.Tensor:
        return self.loss_sum / self.presented.clamp(min=1)

    # state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name).detach().cpu().clone() for name in _FIELDS}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in _FIELDS:
            current = getattr(self, name)
            value = torch.as_tensor(state[name])
            if value.shape != current.shape:
                raise ValueError(f"Expected per-sample statistics for {self.num_samples} training samples, got "
                                 f"{tuple(value.shape)} for `{name}`: the checkpoint comes from another dataset")
            setattr(self, name, value.to(device=current.device, dtype=current.dtype))


def removal_order(scores: torch.Tensor, candidates: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The ``candidates`` (sample indices) sorted by ascending ``scores`` (indexed by sample), ties
    in a random order drawn from ``generator`` (the same on every rank given the same seed)."""
    candidates = candidates.cpu()
    shuffled = candidates[torch.randperm(len(candidates), generator=generator)]
    order = torch.sort(scores.cpu()[shuffled], stable=True).indices
    return shuffled[order]
