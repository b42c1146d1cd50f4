"""A reservoir replay buffer of (input, label, logits) triples (DER++, Buzzega et al. 2020).

Every example offered has the same chance to be stored, whatever the stream's length (reservoir
sampling, Vitter 1985): the first ``size`` examples fill it; the ``n``-th later one replaces a
uniformly drawn slot ``j`` when ``j = randint(0, n)`` falls below ``size``. All randomness comes
from the generators passed in, so ranks and resumed runs draw the same.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["ReservoirBuffer"]


class ReservoirBuffer:
    def __init__(self, size: int) -> None:
        self.size = int(size)
        self.num_seen = 0
        self.examples: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None

    def __len__(self) -> int:
        return min(self.num_seen, self.size)

    @torch.no_grad()
    def add(self, examples: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor, gen: torch.Generator) -> None:
        """Offer a batch, example by example, in order."""
        if self.examples is None:
            self.examples = examples.new_zeros((self.size, *examples.shape[1:]))
            self.labels = labels.new_zeros((self.size,))
            self.logits = logits.new_zeros((self.size, *logits.shape[1:]))
        slots: dict[int, int] = {}  # slot -> row of the batch (a later row wins a slot)
        for row in range(len(examples)):
            seen = self.num_seen
            slot = seen if seen < self.size else int(torch.randint(0, seen + 1, (1,), generator=gen))
            self.num_seen += 1
            if slot < self.size:
                slots[slot] = row
        if slots:
            where = torch.tensor(list(slots), device=self.examples.device)
            rows = torch.tensor(list(slots.values()), device=examples.device)
            self.examples[where] = examples[rows].to(self.examples.dtype)
            self.labels[where] = labels[rows].to(self.labels.dtype)
            self.logits[where] = logits[rows].to(self.logits.dtype)

    def sample(self, count: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``min(count, len(self))`` distinct stored triples, drawn uniformly."""
        if len(self) == 0:
            raise ValueError("Expected a non-empty buffer to sample from")
        chosen = torch.randperm(len(self), generator=gen)[:min(count, len(self))].to(self.examples.device)
        return self.examples[chosen], self.labels[chosen], self.logits[chosen]

    def to(self, device: torch.device | str) -> ReservoirBuffer:
        for name in ("examples", "labels", "logits"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        return self

    def state_dict(self) -> dict[str, Any]:
        stored = len(self)
        return {"size": self.size, "num_seen": self.num_seen,
                **{name: None if getattr(self, name) is None else getattr(self, name)[:stored].clone()
                   for name in ("examples", "labels", "logits")}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["size"]) != self.size:
            raise ValueError(f"The checkpoint's replay buffer holds {state['size']} examples, this one "
                             f"buffer_size={self.size}: resume with the same buffer_size")
        self.num_seen = int(state["num_seen"])
        for name in ("examples", "labels", "logits"):
            saved = state.get(name)
            if saved is None:
                setattr(self, name, None)
                continue
            full = saved.new_zeros((self.size, *saved.shape[1:]))
            full[:len(saved)] = saved
            setattr(self, name, full)
