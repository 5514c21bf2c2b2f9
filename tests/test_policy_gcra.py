"""GCRA arithmetic with an injected clock: numbers, no sleeping."""

from __future__ import annotations

import pytest

from workers.policy.gcra import Decision, Rate, decide


@pytest.mark.parametrize(
    ("text", "count", "period_s", "interval_s"),
    [
        ("60/h", 60, 3600, 60.0),
        ("10/s", 10, 1, 0.1),
        ("60/m", 60, 60, 1.0),
        ("2/d", 2, 86400, 43200.0),
        ("100/15m", 100, 900, 9.0),
        (" 5 / 2s ", 5, 2, 0.4),
    ],
)
def test_parse_rates(text: str, count: int, period_s: float, interval_s: float) -> None:
    rate = Rate.parse(text)
    assert rate == Rate(count, period_s)
    assert rate.emission_interval_s == pytest.approx(interval_s)
    assert Rate.parse(str(rate)) == rate


def test_rates_print_in_their_largest_whole_unit() -> None:
    assert [str(Rate(60, 3600)), str(Rate(5, 900)), str(Rate(1, 172800)), str(Rate(3, 1.5))] == [
        "60/h", "5/15m", "1/2d", "3/1.5s",
    ]


@pytest.mark.parametrize("text", ["60/w", "60", "/h", "0/h", "ten/s", "60/0m", "-1/s", ""])
def test_bad_rates_raise_naming_the_text(text: str) -> None:
    with pytest.raises(ValueError, match=f"bad rate {text!r}"):
        Rate.parse(text)


def test_a_burst_passes_at_once_and_the_next_waits_exactly_one_interval() -> None:
    rate, tat_s, now_s = Rate.parse("60/m"), 0.0, 1000.0
    for _ in range(3):
        allowed, tat_s, wait_s = decide(tat_s, now_s, rate, burst=3)
        assert (allowed, wait_s) == (True, 0.0)
    assert tat_s == 1003.0
    assert decide(tat_s, now_s, rate, burst=3) == Decision(False, 1003.0, 1.0)
    # Half an interval later, half an interval to go; a whole interval later, it passes.
    assert decide(tat_s, now_s + 0.5, rate, burst=3) == Decision(False, 1003.0, 0.5)
    assert decide(tat_s, now_s + 1.0, rate, burst=3) == Decision(True, 1004.0, 0.0)


def test_a_steady_stream_at_the_rate_never_waits() -> None:
    rate, tat_s = Rate.parse("4/s"), 0.0
    for i in range(100):
        decision = decide(tat_s, 50.0 + i * 0.25, rate)
        assert decision.allowed, i
        tat_s = decision.tat_s


def test_faster_than_the_rate_waits_for_the_rest_of_the_interval() -> None:
    rate = Rate.parse("1/s")
    first = decide(0.0, 10.0, rate)
    assert first == Decision(True, 11.0, 0.0)
    assert decide(first.tat_s, 10.25, rate) == Decision(False, 11.0, 0.75)


def test_an_idle_limit_refills_its_burst_but_no_more() -> None:
    rate, tat_s = Rate.parse("1/s"), 0.0
    for _ in range(2):
        tat_s = decide(tat_s, 0.0, rate, burst=2).tat_s
    # After a long idle the stored tat is in the past: the same as no state.
    later = [decide(tat_s, 100.0, rate, burst=2)]
    later.append(decide(later[0].tat_s, 100.0, rate, burst=2))
    later.append(decide(later[1].tat_s, 100.0, rate, burst=2))
    assert [d.allowed for d in later] == [True, True, False]
    assert later[2].wait_s == 1.0


def test_cost_takes_several_intervals_at_once() -> None:
    rate = Rate.parse("1/s")
    assert decide(0.0, 0.0, rate, burst=5, cost=5) == Decision(True, 5.0, 0.0)
    assert decide(5.0, 0.0, rate, burst=5, cost=2) == Decision(False, 5.0, 2.0)


def test_a_push_back_refuses_until_its_time_whatever_the_rate() -> None:
    rate = Rate.parse("10/s")
    assert decide(0.0, 100.0, rate, burst=5, not_before_s=130.0) == Decision(False, 0.0, 30.0)
    assert decide(0.0, 130.0, rate, burst=5, not_before_s=130.0).allowed


def test_cost_must_be_between_one_and_the_burst() -> None:
    with pytest.raises(ValueError, match="need 1 <= cost <= burst"):
        decide(0.0, 0.0, Rate.parse("1/s"), burst=0)
    with pytest.raises(ValueError, match="a larger cost never passes"):
        decide(0.0, 0.0, Rate.parse("1/s"), burst=2, cost=3)
    with pytest.raises(ValueError, match="count >= 1"):
        Rate(0, 1)


def test_waiting_callers_reserve_turns_one_interval_apart() -> None:
    rate = Rate.parse("10/s")  # 0.1 s apart
    tat = 0.0
    waits = []
    for _ in range(4):  # four callers at the same instant, each willing to wait 0.25 s
        decision = decide(tat, 100.0, rate, max_wait_s=0.25)
        if decision.allowed:
            tat = decision.tat_s
        waits.append((decision.allowed, round(decision.wait_s, 6)))
    assert waits == [(True, 0.0), (True, 0.1), (True, 0.2), (False, 0.3)]
    assert tat == pytest.approx(100.3)  # the refused one left the state alone


def test_a_reserved_turn_falls_after_a_push_back() -> None:
    decision = decide(0.0, 100.0, Rate.parse("10/s"), not_before_s=100.5, max_wait_s=1.0)
    assert decision == Decision(True, pytest.approx(100.6), pytest.approx(0.5))
