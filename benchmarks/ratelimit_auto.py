"""The ``ratelimit`` suite's auto-rate case (issue #21): a harvest against an unannounced
limit, with fanout's limit ``rate = "auto"``, and the vendor's limit halved mid-run.

The demo vendor answers 429 + Retry-After above ``rate_limit_rps`` = 50 and says nothing else
about its limit (``rate_limit_headers`` off: no RateLimit-* headers). fanout's ``demo-vendor``
limit, which every call of the demo pipeline goes through, is set to ``rate="auto"`` (ceiling
200/s, floor 1/s): it has to find the 50/s from the 429s alone. The demo pipeline harvests 3 x
10 x 230 = 6,900 metric-days, about 3 minutes at the rates found (``--quick``: 2 x 10 x 40 =
800), on 3 processes x 8 threads started and answering a ping before the clock; no warm-up
harvest, so the limit starts from nothing. ``http_retries`` is 3: a 429 is sent again after its
Retry-After. 120 s after the trigger (``--quick``: 12 s) the vendor's limit drops to 25/s
through ``/_admin/config``.

From the vendor's per-second series (``per_second`` of ``/_admin/stats``: arrivals, served,
429s per whole second of its monotonic clock), over whole seconds only:

- **achieved**: requests served per second from 20 s after the trigger (``--quick``: 5 s) to
  the drop, as a share of 50/s (target >= 85%);
- **429 share**: 429s / requests over the whole run (target <= 3%), and before/after the drop;
- **follows within**: from the drop to the end of the first whole second from which on fanout
  sent at most 1.2 x 25 = 30 requests a second for 5 seconds running (or until the run's last
  whole second) (target <= 10 s); and the rate served after it.

The run must end ``succeeded`` with exactly its rows, and the vendor must have served (any
answer but a 429) exactly one request per listing page and metric-day, or no number is shown.
"""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass
from typing import Any

from benchmarks.contenders import READY_TIMEOUT_S, FanoutHarness, Shape, WorkerConfig
from benchmarks.core import BenchmarkError, Context, Table
from benchmarks.ratelimit_common import Action, mean_column, run_harvest, seconds_between

CONFIG = WorkerConfig(3, "threads", 8)
VENDOR_RATE = 50
DROPPED_RATE = 25
CEILING, FLOOR = "200/s", "1/s"
TARGET_SHARE = 0.85
MAX_429_SHARE = 0.03
FOLLOW_TARGET_S = 10.0
FOLLOW_SLACK = 1.2  # "follows": at most 1.2 x the new limit sent a second...
FOLLOW_RUN_S = 5  # ...for this many whole seconds running


@dataclass(frozen=True)
class AutoCase:
    shape: Shape
    settle_s: float  # the achieved rate is measured from here (after the trigger)...
    drop_at_s: float  # ...to the vendor's drop to DROPPED_RATE

    @property
    def requests(self) -> int:
        """Served once each: the accounts listing, a services page per account, the leaves."""
        return 1 + self.shape.accounts + self.shape.total


FULL = AutoCase(Shape(3, 10, 230), 20.0, 120.0)
QUICK = AutoCase(Shape(2, 10, 40), 5.0, 12.0)


def set_auto(limits: Any, name: str) -> dict[str, Any]:
    """``rate="auto"`` with a ceiling and a floor; a clear error where fanout has none."""
    try:
        limits.set_limit(name, rate="auto", ceiling=CEILING, floor=FLOOR)
    except (TypeError, ValueError) as exc:
        raise BenchmarkError(f"fanout's limits do not take rate='auto' here: {exc}") from None
    return {"name": name, "rate": "auto", "ceiling": CEILING, "floor": FLOOR}


def auto_rate(ctx: Context) -> tuple[dict[str, Any], dict[str, Any], Table]:
    """Run the case: (settings, figures, table)."""
    from workers.connections import get_redis
    from workers.limits import Limits
    from workers.pipelines.demo import VENDOR_LIMIT

    case = QUICK if ctx.quick else FULL
    env = ctx.env
    vendor = env.vendor_handle
    env.flush()
    if case.shape.services > int(vendor.configure()["page_size"]):
        raise BenchmarkError("services per account must fit one page of the vendor's listing")
    limits = Limits(get_redis())
    # Before any worker starts: a worker must never see the limit unset.
    vendor.configure(latency_ms=0, rate_limit_rps=VENDOR_RATE, rate_limit_headers=False,
                     key_rate_limit_rps=0, accounts=case.shape.accounts,
                     services=case.shape.services)
    limit = set_auto(limits, VENDOR_LIMIT)
    settings: dict[str, Any] = {
        "limit": limit,
        "vendor": {"rate_limit_rps": VENDOR_RATE, "dropped_to": DROPPED_RATE,
                   "rate_limit_headers": False, "latency_ms": 0},
        "shape": {**asdict(case.shape), "total": case.shape.total},
        "settle_s": case.settle_s, "drop_at_s": case.drop_at_s, "requests": case.requests,
        "processes": CONFIG.processes, "pool": CONFIG.pool, "concurrency": CONFIG.concurrency,
        "http_retries": 3, "pipeline": "demo",
    }
    ctx.log(f"  auto: {CONFIG.label}, limit {VENDOR_LIMIT} rate auto ({FLOOR}..{CEILING}), "
            f"vendor 429s above {VENDOR_RATE} rps unannounced, {DROPPED_RATE} rps from "
            f"{case.drop_at_s:g} s; shape {case.shape.label} = {case.requests:,} requests")
    suite_dir = env.suite_dir(f"ratelimit-auto-{secrets.token_hex(3)}")
    harness = FanoutHarness()
    procs = harness.start(env, CONFIG, suite_dir)
    try:
        harness.wait_ready(procs, suite_dir, READY_TIMEOUT_S)
        vendor.reset()
        drop = Action(case.drop_at_s, lambda: vendor.configure(rate_limit_rps=DROPPED_RATE))
        run = run_harvest(env, "demo", case.shape, suite_dir, http_retries=3,
                          timeout_s=max(600.0, 3 * case.requests / DROPPED_RATE),
                          actions=[drop])
        stats = vendor.stats()
    finally:
        env.stop_processes(procs)
        limits.delete_limit(VENDOR_LIMIT)
        vendor.configure(latency_ms=env.latency_ms, rate_limit_rps=0)
    if drop.done_at is None:
        raise BenchmarkError(f"the run ended before the drop at {case.drop_at_s:g} s")
    figures = _figures(case, stats, run.started_at, drop.done_at, run.wall_s)
    figures["checks"] = run.checks
    ctx.log(f"    achieved {figures['achieved_rate']} /s = {figures['achieved_share']:.0%} of "
            f"{VENDOR_RATE}/s; 429s {figures['sent_429']} = {figures['share_429']:.2%}; "
            f"follows the drop within {figures['follow_s']} s")
    return settings, figures, _table(case, figures)


def follow_second(rows: list[Any], limit: float) -> int | None:
    """The first second from which on at most ``FOLLOW_SLACK`` x ``limit`` requests arrived a
    second for ``FOLLOW_RUN_S`` seconds running (fewer if the rows end first), or None."""
    ceiling = FOLLOW_SLACK * limit
    for i, row in enumerate(rows):
        window = rows[i:i + FOLLOW_RUN_S]
        if all(r[1] <= ceiling for r in window):
            return int(row[0])
    return None


def _figures(
    case: AutoCase, stats: dict[str, Any], started_at: float, dropped_at: float, wall_s: float
) -> dict[str, Any]:
    served = int(stats["total"]) - int(stats["sent_429"])
    if served != case.requests:
        raise BenchmarkError(f"the vendor served {served} requests, expected {case.requests} "
                             f"(429s {stats['sent_429']}, status {stats['status']})")
    rows = stats["per_second"]
    if not rows:
        raise BenchmarkError("the vendor's per-second series is empty")
    end = float(rows[-1][0])  # the last second is cut short by the run's end: left out
    settled = seconds_between(rows, started_at + case.settle_s, dropped_at)
    after = seconds_between(rows, dropped_at, end)
    achieved = mean_column(settled, 2)
    follow = follow_second(list(after), DROPPED_RATE)
    follow_s = None if follow is None else round(follow + 1 - dropped_at, 2)
    following = [r for r in after if follow is not None and r[0] >= follow]
    before_rows = [r for r in rows if r[0] < dropped_at]
    after_rows = [r for r in rows if r[0] >= dropped_at]
    total, sent_429 = int(stats["total"]), int(stats["sent_429"])

    def share(part: list[Any]) -> float | None:
        asked = sum(r[1] for r in part)
        return round(sum(r[3] for r in part) / asked, 4) if asked else None

    achieved_share = round(achieved / VENDOR_RATE, 3) if achieved is not None else None
    share_429 = round(sent_429 / total, 4)
    return {
        "requests": case.requests,
        "wall_s": round(wall_s, 2),
        "drop_at_s": round(dropped_at - started_at, 2),
        "achieved_rate": round(achieved, 1) if achieved is not None else None,
        "achieved_seconds": len(settled),
        "achieved_share": achieved_share,
        "sent_429": sent_429,
        "vendor_total": total,
        "share_429": share_429,
        "share_429_before_drop": share(before_rows),
        "share_429_after_drop": share(after_rows),
        "follow_s": follow_s,
        "served_rate_after_follow": (round(mean_column(following, 2) or 0, 1)
                                     if following else None),
        "sent_rate_after_follow": (round(mean_column(following, 1) or 0, 1)
                                   if following else None),
        # [seconds since the trigger, arrived, served, 429s]: the whole run
        "series": [[round(r[0] - started_at, 1), *r[1:]] for r in rows],
        "meets_target": (achieved_share is not None and achieved_share >= TARGET_SHARE
                         and share_429 <= MAX_429_SHARE and follow_s is not None
                         and follow_s <= FOLLOW_TARGET_S),
    }


def _pct(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value * 100:.{digits}f}%"


def _table(case: AutoCase, f: dict[str, Any]) -> Table:
    met = {True: "met", False: "MISSED"}
    achieved_ok = f["achieved_share"] is not None and f["achieved_share"] >= TARGET_SHARE
    follow_ok = f["follow_s"] is not None and f["follow_s"] <= FOLLOW_TARGET_S
    rows = [
        ["limit", f"demo-vendor rate auto ({FLOOR} to {CEILING}); vendor 429s above "
                  f"{VENDOR_RATE} rps, no RateLimit headers"],
        ["workers", f"{CONFIG.label}, 0 ms vendor latency"],
        ["requests served", f"1 + {case.shape.accounts} + {case.shape.label} = "
                            f"{case.requests:,}; wall {f['wall_s']:.1f} s"],
        [f"served/s from {case.settle_s:g} s to the drop",
         f"{f['achieved_rate']} = {_pct(f['achieved_share'])} of {VENDOR_RATE}/s over "
         f"{f['achieved_seconds']} s (target >= {TARGET_SHARE:.0%}: {met[achieved_ok]})"],
        ["429s / requests", f"{f['sent_429']} / {f['vendor_total']:,} = "
                            f"{_pct(f['share_429'], 2)} (target <= {MAX_429_SHARE:.0%}: "
                            f"{met[f['share_429'] <= MAX_429_SHARE]}); before the drop "
                            f"{_pct(f['share_429_before_drop'], 2)}, after "
                            f"{_pct(f['share_429_after_drop'], 2)}"],
        [f"vendor drops to {DROPPED_RATE}/s at", f"{f['drop_at_s']:.1f} s"],
        ["fanout follows within", f"{f['follow_s']} s (target <= {FOLLOW_TARGET_S:g} s: "
                                  f"{met[follow_ok]})"],
        ["after that: sent / served per s",
         f"{f['sent_rate_after_follow']} / {f['served_rate_after_follow']}"],
    ]
    return Table(
        f"Auto rate against an unannounced {VENDOR_RATE}/s, then {DROPPED_RATE}/s",
        ["what", "value"], rows,
        caption="whole seconds of the vendor's per-second series; follows: the end of the "
                f"first second from which on fanout sent <= {FOLLOW_SLACK:g} x {DROPPED_RATE} "
                f"a second for {FOLLOW_RUN_S} s running",
    )
