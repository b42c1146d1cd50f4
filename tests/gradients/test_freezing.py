"""The freezing schedules; Composer's against its formula re-derived here from its source."""

import itertools

from lit_eff.gradients import composer_count, first_step, window_count


def composer_reference(step: int, total_steps: int, n_units: int, freeze_level: float, freeze_start: float) -> int:
    """Composer's LayerFreezing (``_freeze_schedule`` and ``freeze_layers``) at elapsed duration
    ``step / total_steps``: no freezing while ``d <= freeze_start``; then the fraction
    ``freeze_level · (d − s) / (1 − s)`` of the layers, truncated with ``int``."""
    current_duration = step / total_steps
    if current_duration <= freeze_start:
        freeze_percentage = 0.0
    else:
        total_freezing_time = 1.0 - freeze_start
        freezing_time_elapsed = current_duration - freeze_start
        freeze_percentage = freeze_level * (freezing_time_elapsed / total_freezing_time)
    return int(freeze_percentage * n_units)


def test_composer_schedule_equals_composers_formula():
    for total, n, level, start in itertools.product((7, 8, 100, 1000), (2, 3, 4, 12), (0.3, 0.5, 0.75, 1.0),
                                                    (0.0, 0.25, 0.5, 0.9)):
        for step in range(total + 1):
            assert composer_count(step, total, n, level, start) == composer_reference(step, total, n, level, start), \
                (step, total, n, level, start)


def test_composer_freezes_unit_i_at_s_plus_i_over_level_n_of_the_rest():
    """Unit i (1-based) freezes at the first step past ``s + (1 − s) · i / (level · n)``: the
    first unit not at ``freeze_start`` but one spacing later."""
    total, n, level, s = 1000, 4, 1.0, 0.2
    for i in range(1, 5):
        at = s + (1 - s) * i / (level * n)
        step = first_step(lambda t: composer_count(t, total, n, level, s), i, total)
        assert abs(step / total - at) <= 1 / total, (i, step)
    assert composer_count(200, total, n, level, s) == composer_count(399, total, n, level, s) == 0
    assert composer_count(400, total, n, level, s) == 1
    # with level · n = 1.5 one unit freezes, two thirds of the way past s (not never, as floor(1.5) = 1 would say)
    assert first_step(lambda t: composer_count(t, 900, 3, 0.5, 0.0), 1, 900) == 600


def test_window_schedule_freezes_units_one_by_one_between_start_and_end():
    counts = [window_count(s, 100, 8, 0.5, 0.2, 0.8) for s in range(100)]
    assert counts[:20] == [0] * 20 and counts[20] == 1  # the first unit at freeze_start
    assert counts[80:] == [4] * 20 and counts[79] == 3  # the 4th (k = 0.5 * 8) at freeze_end
    assert all(b - a in (0, 1) for a, b in zip(counts, counts[1:]))  # monotone, one at a time
    assert [window_count(s, 10, 4, 0.75, 0.5, 0.5) for s in (4, 5)] == [0, 3]  # all at once
    assert window_count(99, 100, 3, 0.3, 0.0, 1.0) == 0  # floor(0.9) units: none


def test_first_step_finds_where_a_monotone_count_arrives():
    count = [0, 0, 1, 1, 3, 3].__getitem__
    assert [first_step(count, u, 5) for u in (0, 1, 2, 3, 4)] == [0, 2, 4, 4, None]
