"""The shared training-length lookup names the callback and what to set when the length is unknown."""

from types import SimpleNamespace

import pytest

from lit_eff.callbacks import LayerFreezing, MagnitudePruning
from lit_eff.callbacks._checks import training_steps


def test_training_steps_reads_the_trainer():
    assert training_steps(SimpleNamespace(estimated_stepping_batches=120), "X", "set y") == 120


@pytest.mark.parametrize("estimated", [float("inf"), 0])
def test_unknown_length_names_the_callback_and_the_fix(estimated):
    trainer = SimpleNamespace(estimated_stepping_batches=estimated)
    with pytest.raises(ValueError, match=r"^X cannot tell the length of training: set y$"):
        training_steps(trainer, "X", "set y")


@pytest.mark.parametrize("callback, fix", [(LayerFreezing(), "set `total_steps` or trainer.max_steps"),
                                           (MagnitudePruning(final_sparsity=0.5), "set `end_step` or trainer.max_steps")])
def test_callbacks_fail_before_training_on_an_endless_run(callback, fix):
    trainer = SimpleNamespace(estimated_stepping_batches=float("inf"))
    with pytest.raises(ValueError, match=rf"{type(callback).__name__} cannot tell the length of training: {fix}"):
        callback.on_fit_start(trainer, None)
