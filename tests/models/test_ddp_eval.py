"""Distributed evaluation equals single-process evaluation on the same weights: every sample is
seen once (359 digits test images, not 360) and losses are summed over both processes."""

import pytest
import torch

from tests.helpers import digits, make_trainer, seeded, text, tiny_gpt, tiny_vit


def evaluate(model, data, **trainer_kwargs):
    trainer = make_trainer(limit_val_batches=None, limit_test_batches=None, **trainer_kwargs)
    val = trainer.validate(model, datamodule=data(), verbose=False)[0]
    test = trainer.test(model, datamodule=data(), verbose=False)[0]
    return {**val, **test}


@pytest.mark.parametrize("make, data, kwargs", [
    (tiny_vit, digits, {"batch_size": 32}),
    (tiny_gpt, text, {"batch_size": 64, "val_fraction": 0.049, "test_fraction": 0.049}),  # 713 blocks each
])
def test_two_processes_evaluate_like_one(make, data, kwargs, tmp_path):
    seeded(0)
    model = make()
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    make_data = lambda: data(**kwargs)  # noqa: E731
    single = evaluate(model, make_data)
    model.load_state_dict(torch.load(path))
    spawned = evaluate(model, make_data, strategy="ddp_spawn", devices=2)
    assert set(single) == set(spawned) and {"val/loss", "test/loss"} <= set(single)
    for key, value in single.items():
        assert spawned[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    if make is tiny_vit:  # 359 test images: an accuracy is a whole number of them
        assert single["test/acc"] * 359 == pytest.approx(round(single["test/acc"] * 359), abs=1e-3)
