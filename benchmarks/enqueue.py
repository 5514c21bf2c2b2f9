"""Bulk enqueue: children per second published from one process, no worker consuming.

- fanout: ``publish_children(stage, run_id, parent_id, items)`` for the demo ``metric_day``
  stage, i.e. item ids + ledger registration (Lua) + bulk publish (one Redis pipeline per
  batch); the figure includes the registration. Also timed apart: ids, register, publish.
- one-by-one: ``stage.task.apply_async(args)`` per child, no batch (what ``.delay()`` does),
  same messages, no ledger.
- stock Celery: ``add.delay(1, 2)`` per message on the hand-written baseline app.
Every figure is checked against the queue length afterwards.
"""

from __future__ import annotations

import secrets
import statistics
import time
from typing import Any

from benchmarks.core import BenchmarkError, Context, SuiteResult, Table, fmt_rate, fmt_ratio

FULL_N = 20_000
QUICK_N = 2_000
FANOUT_REPEATS = 3
TARGET_PER_S = 20_000
ROOT_ID = "accounts:bench-root"
PARAMS = {"days": 1, "end_day": "2026-01-31", "vendor_url": "http://127.0.0.1:1",
          "http_retries": 0}


def metric_day_items(n: int) -> list[dict[str, str]]:
    """``n`` distinct metric_day payloads shaped like the demo pipeline's."""
    return [
        {"account": f"acct-{i // 1500 + 1:03d}", "service": f"svc-{i // 30 % 50 + 1:03d}",
         "metric": "requests", "day": f"2026-01-{i % 30 + 1:02d}"}
        for i in range(n)
    ]


def fresh_run(ctx: Context, label: str) -> str:
    """A FLUSHALL, then a run with one registered root (a run with no roots is born finished)."""
    from workers.engine.services import services

    ctx.env.flush()
    run_id = f"bench-{label}-{secrets.token_hex(3)}"
    services().ledger.runs.create(run_id, "demo", PARAMS, "accounts", [(ROOT_ID, {"account": "x"})])
    return run_id


def _check_queue(ctx: Context, queue: str, n: int) -> None:
    got = int(ctx.env.redis.llen(queue))
    if got != n:
        raise BenchmarkError(f"queue {queue} holds {got} messages, expected {n}")


def enqueue(ctx: Context) -> SuiteResult:
    from benchmarks import celery_baseline
    from producers.trigger import load_configured_pipelines
    from workers.api import get_pipeline
    from workers.celery import app
    from workers.engine.runner import publish_children
    from workers.engine.services import services
    from workers.ids import item_id
    from workers.message import Delivery

    load_configured_pipelines()
    n = QUICK_N if ctx.quick else FULL_N
    stage = get_pipeline("demo").stages["metric_day"]
    task = app.tasks[stage.task_name]
    svc = services()
    ledger = svc.ledger
    items = metric_day_items(n)
    result = SuiteResult("enqueue", settings={
        "children": n, "stage": stage.task_name, "fanout_repeats": FANOUT_REPEATS,
        "target_per_s": TARGET_PER_S, "worker_consuming": False,
    })

    # Warm-up: connections, the Lua scripts' SHA cache, the producer pool.
    run_id = fresh_run(ctx, "warmup")
    publish_children(svc, stage, run_id, ROOT_ID, items[:200])

    ctx.log(f"  fanout publish_children x{FANOUT_REPEATS}: {n:,} children")
    fanout_runs: list[float] = []
    for _ in range(FANOUT_REPEATS):
        run_id = fresh_run(ctx, "fanout")
        started = time.perf_counter()
        count = publish_children(svc, stage, run_id, ROOT_ID, items)
        elapsed = time.perf_counter() - started
        if count != n:
            raise BenchmarkError(f"publish_children returned {count}, expected {n}")
        _check_queue(ctx, stage.queue, n)
        snapshot = ledger.view.snapshot(run_id)
        registered = snapshot.stages["metric_day"]["enqueued"] if snapshot else 0
        if registered != n:
            raise BenchmarkError(f"the ledger registered {registered}, expected {n}")
        fanout_runs.append(n / elapsed)
    fanout_rate = statistics.median(fanout_runs)

    # Where fanout's time goes: ids, ledger registration, bulk publish, each timed apart.
    run_id = fresh_run(ctx, "parts")
    t0 = time.perf_counter()
    entries = [(item_id(stage.name, ROOT_ID, i, item), item) for i, item in enumerate(items)]
    t1 = time.perf_counter()
    ledger.items.register(run_id, stage.name, entries)
    t2 = time.perf_counter()
    svc.transport.publish([Delivery(stage.task_name, run_id, i, item) for i, item in entries])
    t3 = time.perf_counter()
    _check_queue(ctx, stage.queue, n)
    parts = {"item_ids_s": t1 - t0, "ledger_register_s": t2 - t1, "bulk_publish_s": t3 - t2}

    ctx.log(f"  one-by-one apply_async: {n:,} messages")
    run_id = fresh_run(ctx, "one-by-one")
    started = time.perf_counter()
    for child_id, item in entries:
        task.apply_async((run_id, child_id, item), task_id=f"{run_id}.{child_id}")
    one_by_one_rate = n / (time.perf_counter() - started)
    _check_queue(ctx, stage.queue, n)

    ctx.log(f"  stock Celery add.delay(1, 2): {n:,} messages")
    ctx.env.flush()
    celery_baseline.declare_queue()
    celery_baseline.add.delay(0, 0)  # warm-up: the producer connection
    ctx.env.flush()
    celery_baseline.declare_queue()
    started = time.perf_counter()
    for i in range(n):
        celery_baseline.add.delay(i, 2)
    stock_rate = n / (time.perf_counter() - started)
    _check_queue(ctx, celery_baseline.QUEUE, n)

    rates: dict[str, Any] = {
        "fanout_publish_children": round(fanout_rate, 1),
        "one_by_one_apply_async": round(one_by_one_rate, 1),
        "stock_celery_delay": round(stock_rate, 1),
    }
    result.figures = {
        "children_per_s": rates,
        "fanout_runs_per_s": [round(r, 1) for r in fanout_runs],
        "fanout_parts_s": {k: round(v, 4) for k, v in parts.items()},
        "fanout_parts_per_s": {k: round(n / v, 1) for k, v in parts.items() if v},
        "ratio_fanout_vs_one_by_one": round(fanout_rate / one_by_one_rate, 2),
        "meets_target": fanout_rate >= TARGET_PER_S,
    }
    table = Table(
        f"Bulk enqueue: {n:,} metric_day children from one process, nobody consuming",
        ["path", "children/s", "fanout / this", "seconds"],
        caption=f"target for fanout >= {TARGET_PER_S:,}/s: "
                f"{'met' if fanout_rate >= TARGET_PER_S else 'NOT met'}; "
                f"fanout = median of {FANOUT_REPEATS}",
    )
    table.rows += [
        ["fanout publish_children (ids + ledger + bulk publish)", fmt_rate(fanout_rate),
         "1.00x", f"{n / fanout_rate:.3f}"],
        ["  of which: item ids", fmt_rate(n / parts["item_ids_s"]), "",
         f"{parts['item_ids_s']:.3f}"],
        ["  of which: ledger register (Lua)", fmt_rate(n / parts["ledger_register_s"]), "",
         f"{parts['ledger_register_s']:.3f}"],
        ["  of which: bulk publish", fmt_rate(n / parts["bulk_publish_s"]), "",
         f"{parts['bulk_publish_s']:.3f}"],
        ["one-by-one apply_async (same messages, no ledger)", fmt_rate(one_by_one_rate),
         fmt_ratio(fanout_rate / one_by_one_rate), f"{n / one_by_one_rate:.3f}"],
        ["stock Celery add.delay(1, 2)", fmt_rate(stock_rate),
         fmt_ratio(fanout_rate / stock_rate), f"{n / stock_rate:.3f}"],
    ]
    result.tables.append(table)
    return result
