"""Kill switches: pure decisions on counters, and their JSON specs."""

from __future__ import annotations

import json
from typing import Any

import pytest

from workers.policy.kill_switch import (
    AnyFailed,
    Counts,
    FailureCount,
    FailureRate,
    Trip,
    check,
    from_spec,
    parse,
    to_spec,
)


def more_failed_than_succeeded(counts: Counts) -> bool:
    """A custom switch: module level, so it can travel to workers by its import path."""
    return counts.failed > counts.succeeded


def test_counts_total_every_terminal_state() -> None:
    assert Counts(succeeded=3, failed=2, skipped=1, cached=4).finished == 10
    assert Counts().finished == 0


def test_any_failed_trips_on_the_first_failure() -> None:
    assert check(AnyFailed(), Counts(succeeded=10)) is None
    assert check(AnyFailed(), Counts(succeeded=1, failed=1)) == Trip("AnyFailed: 1 failed")


def test_failure_count_trips_at_max_count_cumulatively() -> None:
    switch = FailureCount(3)
    assert check(switch, Counts(succeeded=50, failed=2)) is None
    assert check(switch, Counts(failed=3)) == Trip("FailureCount: 3 failed >= 3")
    assert check(switch, Counts(failed=7)) == Trip("FailureCount: 7 failed >= 3")


def test_failure_rate_waits_for_its_sample_then_trips_above_the_rate() -> None:
    switch = FailureRate(min_sample=10, max_fail_rate=0.2)
    assert check(switch, Counts(failed=9)) is None  # 9 finished: below the sample
    assert check(switch, Counts(succeeded=8, failed=2)) is None  # exactly 0.2 is not above
    assert check(switch, Counts(succeeded=7, failed=3)) == Trip(
        "FailureRate: 3/10 failed = 0.3 > 0.2"
    )
    # Skipped and cached items count as finished.
    assert check(switch, Counts(failed=3, cached=12)) is None


def test_a_callable_on_the_counters_is_a_switch() -> None:
    assert check(more_failed_than_succeeded, Counts(succeeded=2, failed=1)) is None
    trip = check(more_failed_than_succeeded, Counts(succeeded=1, failed=2))
    assert trip is not None
    assert trip.reason.startswith("more_failed_than_succeeded: tripped at Counts(")
    assert check(lambda c: c.skipped > 0, Counts(skipped=1)) is not None


def test_no_switch_never_trips() -> None:
    assert check(None, Counts(failed=100)) is None


@pytest.mark.parametrize(
    ("switch", "spec"),
    [
        (AnyFailed(), {"kind": "any_failed"}),
        (FailureCount(3), {"kind": "failure_count", "max_count": 3}),
        (FailureRate(10, 0.2), {"kind": "failure_rate", "min_sample": 10, "max_fail_rate": 0.2}),
        (more_failed_than_succeeded,
         {"kind": "callable", "ref": f"{__name__}:more_failed_than_succeeded"}),
    ],
)
def test_switches_round_trip_through_json_specs(switch: Any, spec: dict[str, Any]) -> None:
    assert to_spec(switch) == spec
    assert from_spec(json.loads(json.dumps(spec))) == switch


def test_switches_that_cannot_travel_are_refused() -> None:
    with pytest.raises(ValueError, match="cannot travel to workers"):
        to_spec(lambda c: True)

    def local(counts: Counts) -> bool:
        return False

    with pytest.raises(ValueError, match="cannot travel to workers"):
        to_spec(local)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"kind": "nope"}, "unknown kill switch spec"),
        ({}, "unknown kill switch spec"),
        ({"kind": "failure_count"}, "lacks 'max_count'"),
        ({"kind": "failure_rate", "min_sample": 5}, "lacks 'max_fail_rate'"),
        ({"kind": "failure_count", "max_count": 0}, "max_count must be a whole number >= 1"),
        ({"kind": "failure_rate", "min_sample": 5, "max_fail_rate": 1.5},
         r"max_fail_rate must be a fraction in \[0, 1\)"),
        ({"kind": "failure_rate", "min_sample": 0, "max_fail_rate": 0.5},
         "min_sample must be a whole number >= 1"),
        ({"kind": "callable", "ref": "no.such.module:fn"}, "cannot be imported"),
        ({"kind": "callable", "ref": "json:__version__"}, "is not callable"),
    ],
)
def test_bad_specs_raise_value_error(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        from_spec(spec)


@pytest.mark.parametrize(
    ("text", "switch"),
    [
        ("any_failed", AnyFailed()),
        (" any_failed ", AnyFailed()),
        ("failure_count:3", FailureCount(3)),
        ("failure_rate:10:0.2", FailureRate(10, 0.2)),
        ("test_policy_kill_switch:more_failed_than_succeeded", more_failed_than_succeeded),
    ],
)
def test_the_text_form_of_each_switch(text: str, switch: Any) -> None:
    assert parse(text) == switch


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bogus", "kill switch 'bogus': expected one of any_failed, failure_count:MAX, "
                  "failure_rate:MIN_SAMPLE:MAX_RATE, package.module:function"),
        ("any_failed:1", "kill switch 'any_failed:1': expected one of"),
        ("failure_count:x", "failure_count:MAX takes a whole number"),
        ("failure_count:0", "FailureCount max_count must be a whole number >= 1, got 0"),
        ("failure_rate:10", "failure_rate:MIN_SAMPLE:MAX_RATE takes a whole number and a rate"),
        ("failure_rate:10:2", "failure_rate:MIN_SAMPLE:MAX_RATE takes a whole number and a rate"),
        ("no_such_module:fn", "kill switch 'no_such_module:fn' cannot be imported"),
        ("a b:c", "expected one of"),
    ],
)
def test_a_bad_text_form_says_what_is_expected(text: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse(text)
    assert message in str(caught.value)
