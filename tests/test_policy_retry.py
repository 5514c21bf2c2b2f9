"""The retry policy: pure, with an injected random source and exact numbers."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from workers.policy.retry import OPTIONS, Exponential, RetryPolicy, exponential


def fixed(*values: float) -> Callable[[], float]:
    """A random source that returns ``values`` in turn."""
    draws = iter(values)
    return lambda: next(draws)


class Transient(Exception):
    pass


class Permanent(Exception):
    pass


def test_attempts_count_from_one_and_retries_bound_them() -> None:
    policy = RetryPolicy(retries=3)
    assert [policy.should_retry(ValueError(), attempt) for attempt in (1, 2, 3, 4, 5)] == [
        True, True, True, False, False,
    ]
    assert not RetryPolicy(retries=0).should_retry(ValueError(), 1)
    with pytest.raises(ValueError, match="counts from 1"):
        policy.should_retry(ValueError(), 0)


def test_a_number_delay_is_the_same_every_time() -> None:
    policy = RetryPolicy(retries=5, delay_s=2.5)
    assert [policy.delay_for(a) for a in (1, 2, 3, 10)] == [2.5, 2.5, 2.5, 2.5]


def test_a_list_delay_is_indexed_by_attempt_and_its_last_element_repeats() -> None:
    # Seed 004's retry_delay_seconds=[1, 10, 100].
    policy = RetryPolicy(retries=5, delay_s=[1, 10, 100])
    assert policy.delay_s == (1.0, 10.0, 100.0)
    assert [policy.delay_for(a) for a in (1, 2, 3, 4, 5)] == [1.0, 10.0, 100.0, 100.0, 100.0]


def test_an_exponential_delay_doubles_up_to_its_cap() -> None:
    policy = RetryPolicy(retries=10, delay_s=exponential(0.5, max_s=5))
    assert [policy.delay_for(a) for a in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert exponential(1, factor=3, max_s=100).delay_s(4) == 27.0
    assert Exponential(1.0).delay_s(5000) == 3600.0  # no overflow, the default cap


def test_jitter_scales_the_delay_within_one_plus_or_minus_the_fraction() -> None:
    policy = RetryPolicy(retries=3, delay_s=10, jitter=0.5)
    assert policy.delay_for(1, rand=fixed(0.0)) == 5.0
    assert policy.delay_for(1, rand=fixed(0.25)) == 7.5
    assert policy.delay_for(1, rand=fixed(0.5)) == 10.0
    assert policy.delay_for(1, rand=fixed(0.75)) == 12.5


def test_jitter_applies_after_the_exponential_cap_so_capped_delays_still_spread() -> None:
    policy = RetryPolicy(retries=10, delay_s=exponential(1, max_s=8), jitter=0.25)
    assert policy.delay_for(9, rand=fixed(0.0)) == 6.0
    assert policy.delay_for(9, rand=fixed(0.5)) == 8.0


def test_jitter_really_varies_with_the_default_random_source() -> None:
    policy = RetryPolicy(retries=1, delay_s=10, jitter=0.2)
    delays = [policy.delay_for(1) for _ in range(50)]
    assert all(8.0 <= d <= 12.0 for d in delays)
    assert len(set(delays)) > 40
    seeded = random.Random(4)
    assert len({policy.delay_for(1, rand=seeded.random) for _ in range(20)}) == 20


def test_no_jitter_draws_nothing() -> None:
    def no_draw() -> float:
        raise AssertionError("drew a random number without jitter")

    assert RetryPolicy(delay_s=3).delay_for(1, rand=no_draw) == 3.0


def test_retry_on_limits_the_exception_types() -> None:
    policy = RetryPolicy(retries=2, retry_on=(Transient, TimeoutError))
    assert policy.should_retry(Transient(), 1)
    assert policy.should_retry(TimeoutError(), 1)
    assert not policy.should_retry(Permanent(), 1)
    # The default retries every Exception, but not what only derives from BaseException.
    assert RetryPolicy(retries=1).should_retry(Permanent(), 1)
    assert not RetryPolicy(retries=1).should_retry(KeyboardInterrupt(), 1)


def test_retry_if_is_asked_about_the_exception_after_the_type_matches() -> None:
    asked: list[BaseException] = []

    def only_5xx(exc: BaseException) -> bool:
        asked.append(exc)
        return "5" in str(exc)

    policy = RetryPolicy(retries=2, retry_on=(Transient,), retry_if=only_5xx)
    assert policy.should_retry(Transient("503"), 1)
    assert not policy.should_retry(Transient("404"), 1)
    assert not policy.should_retry(Permanent("503"), 1)
    assert not policy.should_retry(Transient("503"), 3)
    assert [str(e) for e in asked] == ["503", "404"]


def test_from_options_maps_stage_options_onto_the_policy() -> None:
    policy = RetryPolicy.from_options(
        retries=3, retry_delay_s=[1, 10, 100], retry_jitter=0.1, retry_on=Transient,
    )
    assert policy == RetryPolicy(3, (1.0, 10.0, 100.0), 0.1, (Transient,))
    assert RetryPolicy.from_options() == RetryPolicy()
    assert RetryPolicy.from_options(retry_on=[Transient, Permanent]).retry_on == (
        Transient, Permanent,
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"retries": -1}, "retries must be a whole number >= 0, got -1"),
        ({"retries": 1.5}, "retries must be a whole number"),
        ({"retries": True}, "retries must be a whole number"),
        ({"retry_delay_s": -2}, "retry_delay_s must be a number of seconds >= 0, got -2"),
        ({"retry_delay_s": []}, "retry_delay_s is an empty list"),
        ({"retry_delay_s": [1, -1]}, "each retry_delay_s must be a number of seconds >= 0"),
        ({"retry_delay_s": "10"}, "retry_delay_s must be a number of seconds"),
        ({"retry_delay_s": float("inf")}, "retry_delay_s must be a number of seconds"),
        ({"retry_jitter": 1.5}, r"retry_jitter must be a fraction in \[0, 1\], got 1.5"),
        ({"retry_jitter": -0.1}, "retry_jitter must be a fraction"),
        ({"retry_on": ValueError()}, "retry_on must be one or more exception types"),
        ({"retry_on": [int]}, "retry_on must be one or more exception types"),
        ({"retry_on": []}, "retry_on must be one or more exception types"),
        ({"retry_if": "yes"}, "retry_if must be a callable"),
    ],
)
def test_from_options_rejects_bad_input_with_a_clear_message(
    options: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        RetryPolicy.from_options(**options)  # type: ignore[arg-type]


def test_bad_exponentials_and_direct_construction_are_rejected_too() -> None:
    with pytest.raises(ValueError, match="factor must be a number >= 1"):
        exponential(1, factor=0.5)
    with pytest.raises(ValueError, match="exponential base_s must be"):
        exponential(-1)
    with pytest.raises(ValueError, match="exponential max_s must be"):
        exponential(1, max_s=-5)
    with pytest.raises(ValueError, match="jitter must be a fraction"):
        RetryPolicy(jitter=2)
    with pytest.raises(ValueError, match="delay_s is an empty list"):
        RetryPolicy(delay_s=())


def test_the_declared_stage_options_are_from_options_arguments_with_its_defaults() -> None:
    # What Pipeline.stage accepts and fills in is exactly what builds the policy.
    assert RetryPolicy.from_options(**OPTIONS.defaults) == RetryPolicy()
    assert OPTIONS.of({"retries": 2, "cache": "inputs"}) == {**OPTIONS.defaults, "retries": 2}
    with pytest.raises(ValueError, match="retry_jitter must be a fraction"):
        OPTIONS.check({**OPTIONS.defaults, "retry_jitter": 3})
