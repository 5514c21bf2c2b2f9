"""The ``ratelimit`` suite's per-key and auto-rate arithmetic on given vendor stats (no run
needed): whole seconds of the vendor's series, when a rate has followed a drop, and the
figures and verdicts each case reports."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks import ratelimit_auto, ratelimit_keys
from benchmarks.core import BenchmarkError
from benchmarks.ratelimit_common import mean_column, seconds_between


def test_whole_seconds_only_and_missing_seconds_as_zeros() -> None:
    rows = [[10, 5, 5, 0], [11, 7, 6, 1], [13, 2, 2, 0]]
    # [10.5, 13.2): 11 and 12 lie inside it whole, 10 and 13 do not; 12 saw nothing.
    assert seconds_between(rows, 10.5, 13.2) == [[11, 7, 6, 1], [12, 0, 0, 0]]
    assert seconds_between(rows, 10.0, 14.0) == [rows[0], rows[1], [12, 0, 0, 0], rows[2]]
    assert seconds_between(rows, 11.2, 11.9) == []
    assert mean_column(seconds_between(rows, 10.0, 12.0), 2) == 5.5
    assert mean_column([], 1) is None


def test_the_rate_follows_from_the_first_second_that_stays_under_the_slack() -> None:
    # 1.2 x 25 = 30 a second, 5 seconds running; a dip at 101 alone does not count.
    rows = [[100, 50, 25, 25], [101, 28, 25, 3], [102, 40, 25, 15], [103, 30, 25, 5],
            [104, 26, 25, 1], [105, 25, 25, 0], [106, 25, 25, 0], [107, 24, 24, 0]]
    assert ratelimit_auto.follow_second(rows, 25) == 103
    assert ratelimit_auto.follow_second(rows[:3], 25) is None
    # Near the end a shorter run counts: the rows end first.
    assert ratelimit_auto.follow_second([[7, 60, 25, 35], [8, 20, 20, 0]], 25) == 8


def _auto_stats(rows: list[list[int]]) -> dict[str, Any]:
    total = sum(r[1] for r in rows)
    refused = sum(r[3] for r in rows)
    return {"total": total, "sent_429": refused, "status": {}, "per_second": rows}


def test_auto_figures() -> None:
    # Trigger at 1000.5, settled from 1002.5: seconds 1003 and 1004 lie whole before the drop
    # at 1005.5; fanout sends <= 30 a second from 1007 on; 1009, the last, is cut short by the
    # run's end and left out. 313 served = 1 listing + 1 services page + 311 metric-days.
    rows = [[1000, 10, 10, 0], [1001, 40, 40, 0], [1002, 50, 49, 1], [1003, 50, 48, 2],
            [1004, 46, 46, 0], [1005, 50, 40, 10], [1006, 45, 25, 20], [1007, 28, 25, 3],
            [1008, 25, 25, 0], [1009, 5, 5, 0]]
    stats = _auto_stats(rows)
    case = ratelimit_auto.AutoCase(ratelimit_auto.Shape(1, 1, 311), 2.0, 5.0)
    f = ratelimit_auto._figures(case, stats, 1000.5, 1005.5, 10.0)
    assert (f["achieved_rate"], f["achieved_seconds"], f["achieved_share"]) == (47.0, 2, 0.94)
    assert f["follow_s"] == 2.5  # the end of second 1007, 2.5 s after the drop
    assert (f["sent_rate_after_follow"], f["served_rate_after_follow"]) == (26.5, 25.0)
    assert (f["sent_429"], f["vendor_total"], f["share_429"]) == (36, 349, round(36 / 349, 4))
    assert f["share_429_after_drop"] == round(23 / 103, 4)  # 1006 on: after 1005.5
    assert f["meets_target"] is False  # 10% of calls were 429s
    assert f["series"][0] == [-0.5, 10, 10, 0]
    short = ratelimit_auto.AutoCase(ratelimit_auto.Shape(1, 1, 312), 2.0, 5.0)
    with pytest.raises(BenchmarkError, match="served 313 requests, expected 314"):
        ratelimit_auto._figures(short, stats, 1000.5, 1005.5, 10.0)


def _key_stats(per_second: dict[str, list[list[int]]]) -> dict[str, Any]:
    by_key = {}
    for token, rows in per_second.items():
        by_key[token] = {"requests": sum(r[1] for r in rows), "sent_429": sum(r[2] for r in rows),
                         "max_rps_1s": max(r[1] for r in rows), "per_second": rows}
    arrivals = [0.0] + [float(i) / 30 for i in range(1, 301)]  # the listing, then 30/s
    seconds = sorted({r[0] for rows in per_second.values() for r in rows})
    totals = [[s, sum(r[1] for rows in per_second.values() for r in rows if r[0] == s)]
              for s in seconds]
    return {"by_key": by_key, "recent_arrivals": arrivals, "per_second": totals}


def test_key_figures_tell_a_pushed_back_token_from_the_others() -> None:
    case = ratelimit_keys.KeysCase(ratelimit_keys.Shape(3, 1, 30), 4.0)  # 31 served per token
    # Triggered at 98.5, pushed at 102.5 for 5 s: the whole seconds 103 to 106, against the
    # undisturbed 101 (from 98.5 + 2 on).
    other = [[100, 5, 0], [101, 10, 0], [102, 9, 0], [103, 4, 0], [104, 1, 0], [105, 1, 0],
             [106, 1, 0]]
    pushed = [[100, 5, 0], [101, 10, 0], [102, 2, 1], [107, 15, 0]]
    stats = _key_stats({"tok-acct-001": other, "tok-acct-002": pushed, "tok-acct-003": other})
    tokens = ["tok-acct-001", "tok-acct-002", "tok-acct-003"]
    f = ratelimit_keys._figures(case, tokens, stats, 11.0, 102.5, 98.5)
    assert f["push_back"]["seconds_during"] == [103, 104, 105, 106]
    assert f["push_back"]["rates"]["tok-acct-002"] == {"before": 10.0, "during": 0.0}
    assert f["push_back"]["rates"]["tok-acct-001"] == {"before": 10.0, "during": 1.75}
    assert f["push_back"]["others_unslowed"] is False  # 1.75 < 0.9 x 10
    assert f["push_back"]["pushed_token_paused"] is True
    assert (f["injected_429s"], f["limit_429s"], f["max_rps_1s"]) == (1, 0, 15)
    assert f["aggregate_rate"] == 30.0
    # Undisturbed: 101 alone lies whole in [98.5 + 2, 102.5): its 30 requests.
    assert (f["steady_rate"], f["steady_seconds"]) == (30.0, 1)
    assert f["meets_target"] is False
    with pytest.raises(BenchmarkError, match="requests served per token"):
        ratelimit_keys._figures(ratelimit_keys.KeysCase(ratelimit_keys.Shape(3, 1, 31), 4.0),
                                tokens, stats, 11.0, 102.5, 98.5)
