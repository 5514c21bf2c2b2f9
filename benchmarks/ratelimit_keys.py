"""The ``ratelimit`` suite's per-key case (issue #21): 3 accounts, each with its own API token,
against a vendor that allows each token 10 requests a second.

The demo vendor lists each account with its token (``account_tokens``) and answers 429 +
Retry-After to a token above ``key_rate_limit_rps`` = 10; its global limit is off. fanout's
limit template ``vendor-token`` is 10/s burst 1, and every call of the ``benchkeys`` pipeline
(``benchmarks/ratelimit_pipeline.py``: one services page per account, one call per metric-day)
goes through it under the call's token, so each token gets a limit of its own, created on first
use. Workers: 3 processes x 8 threads, started and answering a ping before the clock, and a
small warm-up harvest on two of the tokens. ``http_retries`` is 3: a 429 is sent again after its
Retry-After.

Mid-run the vendor is told to answer the next request of one token (``tok-acct-002``) with a
429 and Retry-After: 5 s (``burst_429`` with a key). fanout must push back that token alone: its
requests stop for about 5 s while the other two tokens keep their 10/s.

Figures: the aggregate rate at the vendor over the whole seconds from 2 s after the trigger to
the push-back (target about 30/s; also from its first request to its last, pause included), the
busiest one-second window of each token (target <= 10), the 429s the vendor's own limit sent
(target 0-2; the injected one is counted apart), and each token's mean requests per second over
the whole seconds of the push-back against its undisturbed rate (the whole seconds from 2 s
after the trigger to the push-back): the others must keep 90% of theirs, the pushed-back token
send at most 1 a second.
"""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass
from typing import Any

from benchmarks.contenders import READY_TIMEOUT_S, FanoutHarness, Shape, WorkerConfig
from benchmarks.core import BenchmarkError, Context, Table
from benchmarks.harvest import WARMUP
from benchmarks.ratelimit_common import Action, mean_column, run_harvest, seconds_between

CONFIG = WorkerConfig(3, "threads", 8)
KEY_RATE = 10  # per token: the vendor's limit and fanout's template
MAX_429 = 2  # target: 0-2 429s from the vendor's own limit
PUSHED_TOKEN = "tok-acct-002"
PUSH_BACK_S = 5.0
STEADY_FROM_S = 2.0  # the undisturbed rate is measured from here to the push-back


@dataclass(frozen=True)
class KeysCase:
    shape: Shape
    push_back_at_s: float  # seconds after the trigger

    @property
    def token_requests(self) -> int:
        """One services page per account, one call per metric-day (the listing has no token)."""
        return self.shape.accounts + self.shape.total


FULL = KeysCase(Shape(3, 10, 30), 12.0)  # 3 + 900 = 903 token requests: about 30 s at 3 x 10/s
QUICK = KeysCase(Shape(3, 5, 10), 4.0)  # 3 + 150 = 153: about 5 s


def per_key(ctx: Context) -> tuple[dict[str, Any], dict[str, Any], Table]:
    """Run the case: (settings, figures, table)."""
    import benchmarks.ratelimit_pipeline as keys_pipeline
    from demo_vendor import account_ids, account_token
    from workers.connections import get_redis
    from workers.limits import Limits

    case = QUICK if ctx.quick else FULL
    env = ctx.env
    vendor = env.vendor_handle
    env.flush()
    tokens = [account_token(a) for a in account_ids(case.shape.accounts)]
    page_size = int(vendor.configure()["page_size"])
    if max(case.shape.services, WARMUP.services) > page_size:
        raise BenchmarkError("services per account must fit one page of the vendor's listing")
    limit_text = f"{KEY_RATE}/s"
    settings: dict[str, Any] = {
        "limit": {"template": keys_pipeline.TOKEN_LIMIT, "rate": limit_text, "burst": 1},
        "vendor": {"key_rate_limit_rps": KEY_RATE, "rate_limit_rps": 0, "latency_ms": 0,
                   "account_tokens": True, "rate_limit_headers": False},
        "shape": {**asdict(case.shape), "total": case.shape.total},
        "token_requests": case.token_requests, "processes": CONFIG.processes,
        "pool": CONFIG.pool, "concurrency": CONFIG.concurrency, "http_retries": 3,
        "warmup_shape": asdict(WARMUP),
        "push_back": {"token": PUSHED_TOKEN, "retry_after_s": PUSH_BACK_S,
                      "at_s": case.push_back_at_s},
    }
    ctx.log(f"  per key: {CONFIG.label}, limit {keys_pipeline.TOKEN_LIMIT} {limit_text} burst 1 "
            f"per token, vendor 429s a token above {KEY_RATE} rps, shape {case.shape.label} = "
            f"{case.token_requests:,} token requests over {len(tokens)} tokens")
    vendor.configure(latency_ms=0, rate_limit_rps=0, key_rate_limit_rps=KEY_RATE,
                     account_tokens=True, rate_limit_headers=False,
                     accounts=WARMUP.accounts, services=WARMUP.services)
    limits = Limits(get_redis())
    limits.set_limit(keys_pipeline.TOKEN_LIMIT, rate=limit_text, burst=1)
    suite_dir = env.suite_dir(f"ratelimit-keys-{secrets.token_hex(3)}")
    harness = FanoutHarness({"FANOUT_PIPELINES": "benchmarks.ratelimit_pipeline"})
    procs = harness.start(env, CONFIG, suite_dir)
    try:
        harness.wait_ready(procs, suite_dir, READY_TIMEOUT_S)
        run_harvest(env, keys_pipeline.PIPELINE, WARMUP, suite_dir, http_retries=3,
                    timeout_s=120)
        vendor.configure(accounts=case.shape.accounts, services=case.shape.services)
        vendor.reset()
        push = Action(case.push_back_at_s, lambda: vendor.configure(burst_429={
            "count": 1, "retry_after_s": PUSH_BACK_S, "key": PUSHED_TOKEN}))
        run = run_harvest(env, keys_pipeline.PIPELINE, case.shape, suite_dir, http_retries=3,
                          timeout_s=max(120.0, 5 * case.token_requests / KEY_RATE),
                          actions=[push])
        stats = vendor.stats()
    finally:
        env.stop_processes(procs)
        limits.delete_limit(keys_pipeline.TOKEN_LIMIT)
        vendor.configure(latency_ms=env.latency_ms, key_rate_limit_rps=0, account_tokens=False,
                         burst_429={"count": 0, "retry_after_s": 1.0})
    if push.done_at is None:
        raise BenchmarkError(f"the run ended before the push-back at {case.push_back_at_s} s")
    figures = _figures(case, tokens, stats, run.wall_s, push.done_at, run.started_at)
    figures["checks"] = run.checks
    ctx.log(f"    {figures['steady_rate']} requests/s over {len(tokens)} tokens; busiest "
            f"second per token {figures['max_rps_1s_by_token']}; 429s of the limit "
            f"{figures['limit_429s']}; push-back: {figures['push_back']['rates']}")
    return settings, figures, _table(case, figures)


def _figures(
    case: KeysCase, tokens: list[str], stats: dict[str, Any], wall_s: float, pushed_at: float,
    started_at: float,
) -> dict[str, Any]:
    by_key = stats["by_key"]
    missing = [t for t in tokens if t not in by_key]
    if missing:
        raise BenchmarkError(f"the vendor saw no request of {missing}")
    sent_429 = {t: int(by_key[t]["sent_429"]) for t in tokens}
    # Each token's requests once each, plus one more for each 429 (sent again after it).
    served = {t: int(by_key[t]["requests"]) - sent_429[t] for t in tokens}
    want = case.shape.services * case.shape.days + 1
    if any(n != want for n in served.values()):
        raise BenchmarkError(f"requests served per token {served}, expected {want} each")
    injected = min(sent_429[PUSHED_TOKEN], 1)
    arrivals = sorted(float(t) for t in stats["recent_arrivals"])[1:]  # the listing aside
    span_s = arrivals[-1] - arrivals[0] if len(arrivals) > 1 else 0.0
    max_rps = {t: int(by_key[t]["max_rps_1s"]) for t in tokens}
    # The whole seconds of the push-back, against the undisturbed ones before it.
    during = (pushed_at, pushed_at + PUSH_BACK_S)
    before = (started_at + STEADY_FROM_S, pushed_at)
    rates: dict[str, dict[str, float | None]] = {}
    for token in tokens:
        rows = by_key[token]["per_second"]
        rates[token] = {
            "before": mean_column(seconds_between(rows, *before), 1),
            "during": mean_column(seconds_between(rows, *during), 1),
        }
    others = [t for t in tokens if t != PUSHED_TOKEN]
    unslowed = all((r["during"] or 0) >= 0.9 * (r["before"] or 0) for r in
                   (rates[t] for t in others))
    pushed_stopped = (rates[PUSHED_TOKEN]["during"] or 0) <= 1.0
    limit_429s = sum(sent_429.values()) - injected
    aggregate = round((len(arrivals) - 1) / span_s, 1) if span_s else None
    # Undisturbed: the whole seconds from STEADY_FROM_S after the trigger to the push-back.
    steady_rows = seconds_between(stats["per_second"], started_at + STEADY_FROM_S, pushed_at)
    steady = mean_column(steady_rows, 1)
    return {
        "token_requests": case.token_requests,
        "wall_s": round(wall_s, 3),
        "vendor_span_s": round(span_s, 3),
        "aggregate_rate": aggregate,
        "steady_rate": round(steady, 1) if steady is not None else None,
        "steady_seconds": len(steady_rows),
        "max_rps_1s_by_token": max_rps,
        "max_rps_1s": max(max_rps.values()),
        "sent_429_by_token": sent_429,
        "injected_429s": injected,
        "limit_429s": limit_429s,
        "push_back": {"token": PUSHED_TOKEN, "retry_after_s": PUSH_BACK_S,
                      "seconds_during": [s for s, *_ in seconds_between(
                          by_key[PUSHED_TOKEN]["per_second"], *during)],
                      "rates": rates, "others_unslowed": unslowed,
                      "pushed_token_paused": pushed_stopped},
        "meets_target": (max(max_rps.values()) <= KEY_RATE and limit_429s <= MAX_429
                         and unslowed and pushed_stopped),
    }


def _fmt(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.1f}"


def _table(case: KeysCase, f: dict[str, Any]) -> Table:
    met = {True: "met", False: "MISSED"}
    n = len(f["max_rps_1s_by_token"])
    rows = [
        ["limit", f"vendor-token {KEY_RATE}/s burst 1 per token; vendor 429s a token above "
                  f"{KEY_RATE} rps"],
        ["workers", f"{CONFIG.label}, 0 ms vendor latency"],
        ["token requests", f"{case.shape.accounts} + {case.shape.label} = "
                           f"{case.token_requests:,} over {n} tokens"],
        ["wall (trigger to run end)", f"{f['wall_s']:.2f} s"],
        [f"aggregate rate, {STEADY_FROM_S:g} s to the push-back",
         f"{_fmt(f['steady_rate'])} requests/s over {f['steady_seconds']} s (target about "
         f"{n * KEY_RATE}/s)"],
        ["aggregate rate, first to last request", f"{_fmt(f['aggregate_rate'])} requests/s "
                                                  f"over {f['vendor_span_s']:.1f} s, the "
                                                  f"push-back's pause included"],
        ["busiest second of a token", f"{f['max_rps_1s']}  (target <= {KEY_RATE}: "
                                      f"{met[f['max_rps_1s'] <= KEY_RATE]}); "
         + ", ".join(f"{t} {v}" for t, v in f["max_rps_1s_by_token"].items())],
        ["429s of the vendor's limit", f"{f['limit_429s']}  (target 0-{MAX_429}: "
                                       f"{met[f['limit_429s'] <= MAX_429]}; plus "
                                       f"{f['injected_429s']} injected)"],
    ]
    push = f["push_back"]
    for token, rate in push["rates"].items():
        what = "pushed back" if token == PUSHED_TOKEN else "other token"
        rows.append([f"{token} ({what}): requests/s before / during",
                     f"{_fmt(rate['before'])} / {_fmt(rate['during'])}"])
    rows.append(["a 429 on one token slows no other",
                 met[push["others_unslowed"] and push["pushed_token_paused"]]])
    return Table(
        f"Per-key limits: {n} tokens at {KEY_RATE}/s each",
        ["what", "value"], rows,
        caption=f"mid-run the vendor answered {PUSHED_TOKEN}'s next request 429 + Retry-After "
                f"{PUSH_BACK_S:g} s; rates over the {len(push['seconds_during'])} whole "
                f"seconds after it and the {f['steady_seconds']} undisturbed ones before (the "
                "vendor's per-key per-second series)",
    )

