"""The arithmetic of a rate that finds the vendor's limit (``workers/policy/aimd.py``); the
same steps in Redis are checked in test_limits_auto.py."""

from __future__ import annotations

import pytest

from workers.policy import aimd
from workers.policy.aimd import State


def test_it_starts_moderate_within_the_floor_and_ceiling() -> None:
    assert aimd.start(1, 1000) == State(10.0, True, 0.0)
    assert aimd.start(20, 1000).rate == 20
    assert aimd.start(1, 5).rate == 5


def test_slow_start_doubles_about_every_second_of_successes() -> None:
    state = aimd.start(1, 1000)
    assert aimd.grow(state, 10, 1, 1000) == State(17.0, True, 0.0)
    # A second of calls at the rate, each a success: about x2.
    elapsed_s = 0.0
    while elapsed_s < 1:
        elapsed_s += 1 / state.rate
        state = aimd.grow(state, 1, 1, 1000)
    assert 18 <= state.rate <= 22
    assert aimd.grow(state, 10_000, 1, 1000).rate == 1000  # the ceiling holds


def test_the_first_refusal_halves_then_each_cuts_to_085_at_most_once_a_window() -> None:
    state = State(80.0, True, 0.0)
    state = aimd.cut(state, 100.0, floor=1)
    assert state == State(40.0, False, 100.0)
    assert aimd.cut(state, 100.5, floor=1) == state  # the calls in flight: the same cut
    state = aimd.cut(state, 101.0, floor=1)
    assert state == State(34.0, False, 101.0)
    assert aimd.cut(State(1.1, False, 0.0), 50.0, floor=1).rate == 1  # the floor holds


def test_after_slow_start_it_grows_by_step_per_second_of_successes() -> None:
    state = State(30.0, False, 0.0)
    # 30 successes at 30/s (one second): + STEP.
    assert aimd.grow(state, 30, 1, 1000).rate == pytest.approx(30 + aimd.STEP)
    assert aimd.grow(state, 0, 1, 1000) == state


def test_the_sawtooth_averages_above_85_percent_of_the_limit() -> None:
    """Against a limit L, with one cut each time the rate goes above it: the rate's average
    over the cycles (the issue's target is >= 85% of L)."""
    limit, state, rates = 50.0, State(50.0, False, 0.0), []
    for tick in range(6000):  # 10 minutes in steps of 0.1 s
        now = tick / 10
        rates.append(min(state.rate, limit))
        if state.rate > limit:
            state = aimd.cut(state, now, floor=1)
        else:
            state = aimd.grow(state, round(state.rate / 10), 1, 1000)
    assert sum(rates) / len(rates) >= 0.85 * limit
