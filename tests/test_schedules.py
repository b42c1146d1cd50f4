import math

import pytest

from lit_eff.schedules import Constant, Cosine, Cubic, Exponential, Linear, Polynomial, Step, warmup_cosine
from lit_eff.seeding import derive_seed, generator


def test_ramps_hold_their_ends_and_follow_their_shape():
    lin = Linear(1.0, 0.0, start_step=10, end_step=20)
    assert [lin(s) for s in (0, 10, 15, 20, 99)] == [1.0, 1.0, 0.5, 0.0, 0.0]
    cos = Cosine(0.0, 1.0, 0, 10)
    assert cos(5) == pytest.approx(0.5) and cos(2) == pytest.approx(0.5 * (1 - math.cos(math.pi * 0.2)))
    cubic = Cubic(0.0, 0.8, 0, 100)
    # Zhu & Gupta: s_t = s_f + (s_i - s_f)(1 - t/T)^3
    assert cubic(25) == pytest.approx(0.8 + (0.0 - 0.8) * (1 - 0.25) ** 3)
    assert Polynomial(0.0, 1.0, 0, 10, power=1.0)(3) == pytest.approx(Linear(0.0, 1.0, 0, 10)(3))
    exp = Exponential(1.0, 0.01, 0, 2)
    assert exp(1) == pytest.approx(0.1)
    assert Constant(3)(12345) == 3.0


def test_step_schedule_and_warmup_cosine():
    step = Step([1.0, 0.1, 0.01], milestones=[10, 20])
    assert [step(s) for s in (0, 9, 10, 19, 20, 50)] == [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100) == pytest.approx(0.5)
    assert warmup_cosine(100, 10, 100, min_factor=0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("make, message", [
    (lambda: Linear(0, 1, start_step=5, end_step=2), r"Expected `start_step` <= `end_step`, got start_step=5, end_step=2"),
    (lambda: Linear(0, 1, start_step=-1), r"Expected `start_step` >= 0, got start_step=-1"),
    (lambda: Polynomial(0, 1, power=0), r"Expected `power` > 0, got power=0"),
    (lambda: Exponential(0, 1), r"Expected `start` > 0 and `end` > 0, got start=0, end=1"),
    (lambda: Step([1.0], [5]), r"Expected len\(values\) == len\(milestones\) \+ 1"),
    (lambda: Step([1.0, 2.0, 3.0], [5, 5]), r"Expected strictly increasing `milestones`"),
])
def test_bad_schedules(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_derived_seeds_are_stable_and_distinct():
    assert derive_seed(0, "rigl", 3, "blocks.0") == derive_seed(0, "rigl", 3, "blocks.0")
    assert derive_seed(0, "rigl", 3, "blocks.0") != derive_seed(0, "rigl", 4, "blocks.0")
    a = generator(1, "x").initial_seed()
    assert a == generator(1, "x").initial_seed() and a != generator(2, "x").initial_seed()
