"""When dynamic data removal removes samples, and how many (SparCL's schedule).

Removals happen at the start of the epochs ``e`` with ``0 < e <= until_epoch`` and
``e % every_n_epochs == 0``; each removes ``int(total / (until_epoch / every_n_epochs))`` samples,
where ``total = int(remove_fraction * num_samples)`` (SparCL: 3000 of 10000 samples at epochs 5,
10, 15 and 20, 750 each).

>>> s = RemovalSchedule(remove_fraction=0.3, every_n_epochs=5, until_epoch=20)
>>> s.epochs(), s.per_removal(10000)
([5, 10, 15, 20], 750)
"""

from __future__ import annotations

from dataclasses import dataclass

from lit_eff import validation


@dataclass(frozen=True)
class RemovalSchedule:
    remove_fraction: float = 0.3
    every_n_epochs: int = 5
    until_epoch: int = 20

    def __post_init__(self) -> None:
        validation.check_fraction("remove_fraction", self.remove_fraction, low_open=True, high_open=True)
        validation.check_int("every_n_epochs", self.every_n_epochs, minimum=1)
        validation.check_int("until_epoch", self.until_epoch, minimum=1)
        if self.until_epoch < self.every_n_epochs:
            raise ValueError(f"Expected `until_epoch` >= `every_n_epochs` (removals happen at the multiples of "
                             f"every_n_epochs up to until_epoch), got until_epoch={self.until_epoch}, "
                             f"every_n_epochs={self.every_n_epochs}")

    def is_removal(self, epoch: int) -> bool:
        """Whether samples are removed before ``epoch`` starts."""
        return 0 < epoch <= self.until_epoch and epoch % self.every_n_epochs == 0

    def epochs(self) -> list[int]:
        return [e for e in range(1, self.until_epoch + 1) if self.is_removal(e)]

    def per_removal(self, num_samples: int) -> int:
        """Samples removed at each removal epoch (SparCL's integer arithmetic)."""
        total = int(self.remove_fraction * num_samples)
        return int(total / (self.until_epoch / self.every_n_epochs))
