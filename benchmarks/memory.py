"""Memory: Redis bytes per queued message and per ledger item, and worker RSS.

- per queued message: N messages published, nobody consuming; ``MEMORY USAGE queue SAMPLES 0``
  / ``LLEN`` (the list alone) and the ``used_memory`` delta / N (everything the publish added).
  fanout's ``metric_day`` message vs stock Celery's ``add.delay(1, 2)`` and the hand-written
  baseline's ``metric_day`` message for the same item.
- per ledger item: ``used_memory`` delta / N of ``Items.register`` alone (the items hash and
  the payloads hash, with their keys and counters).
- worker RSS after the harvest: from the harvest suite when it ran in this invocation,
  otherwise from a small fanout harvest run here.
- worker RSS per call in flight: one worker with 10, then 1,000 calls of the demo's async
  leaf waiting on the vendor (``in_flight_memory.py``).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from benchmarks.core import BenchmarkError, Context, SuiteResult, Table, fmt_mib
from benchmarks.enqueue import ROOT_ID, fresh_run, metric_day_items
from benchmarks.in_flight_memory import in_flight_rss

FULL_N = 10_000
QUICK_N = 1_000


def _queue_stats(ctx: Context, queue: str, n: int) -> dict[str, Any]:
    r = ctx.env.redis
    length = int(r.llen(queue))
    if length != n:
        raise BenchmarkError(f"queue {queue} holds {length} messages, expected {n}")
    usage = int(r.memory_usage(queue, samples=0) or 0)
    sample = r.lrange(queue, 0, 99)
    return {
        "messages": length,
        "queue_bytes": usage,
        "bytes_per_message": round(usage / length, 1),
        "raw_message_chars_avg": round(statistics.mean(len(m) for m in sample), 1),
    }


def _measure_publish(
    ctx: Context, queue: str, n: int, publish: Callable[[], None]
) -> dict[str, Any]:
    before = ctx.env.used_memory()
    publish()
    after = ctx.env.used_memory()
    stats = _queue_stats(ctx, queue, n)
    stats["used_memory_delta_per_message"] = round((after - before) / n, 1)
    return stats


def memory(ctx: Context) -> SuiteResult:
    from benchmarks import celery_baseline
    from producers.trigger import load_configured_pipelines
    from workers.api import get_pipeline
    from workers.engine.services import services
    from workers.ids import item_id
    from workers.message import Delivery

    load_configured_pipelines()
    n = QUICK_N if ctx.quick else FULL_N
    stage = get_pipeline("demo").stages["metric_day"]
    svc = services()
    ledger = svc.ledger
    items = metric_day_items(n)
    entries = [(item_id(stage.name, ROOT_ID, i, item), item) for i, item in enumerate(items)]
    result = SuiteResult("memory", settings={"messages": n, "ledger_items": n,
                                             "stage": stage.task_name})
    ctx.log(f"  Redis bytes for {n:,} messages / ledger items")

    # fanout: ledger registration first (its delta alone), then the messages.
    run_id = fresh_run(ctx, "memory")
    before = ctx.env.used_memory()
    ledger.items.register(run_id, stage.name, entries)
    ledger_per_item = (ctx.env.used_memory() - before) / n
    fanout = _measure_publish(ctx, stage.queue, n, lambda: svc.transport.publish(
        [Delivery(stage.task_name, run_id, i, item) for i, item in entries]))

    # Stock Celery: a small task, and the hand-written baseline's leaf message for the same item.
    ctx.env.flush()
    celery_baseline.declare_queue()

    def stock() -> None:
        for i in range(n):
            celery_baseline.add.delay(i, 2)

    stock_add = _measure_publish(ctx, celery_baseline.QUEUE, n, stock)
    ctx.env.flush()
    celery_baseline.declare_queue()
    url = ctx.env.vendor_handle.url

    def baseline_leaf() -> None:
        for item in items:
            celery_baseline.metric_day.delay("celery-memory", url, item)

    baseline = _measure_publish(ctx, celery_baseline.QUEUE, n, baseline_leaf)

    rss = _worker_rss(ctx)
    result.figures = {
        "fanout_message": fanout,
        "celery_add_message": stock_add,
        "celery_baseline_metric_day_message": baseline,
        "ledger_bytes_per_item": round(ledger_per_item, 1),
        "worker_rss_bytes": rss["rss"],
        "worker_rss_source": rss["source"],
    }
    table = Table(
        f"Redis memory: {n:,} queued messages / ledger items",
        ["what", "bytes each (MEMORY USAGE / LLEN)", "used_memory delta each",
         "message JSON chars"],
        caption="used_memory delta includes any other key the publish touched",
    )
    for label, stats in (
        ("fanout metric_day message", fanout),
        ("stock Celery add.delay(1, 2) message", stock_add),
        ("hand-written Celery metric_day message", baseline),
    ):
        table.rows.append([label, f"{stats['bytes_per_message']:,.0f}",
                           f"{stats['used_memory_delta_per_message']:,.0f}",
                           f"{stats['raw_message_chars_avg']:,.0f}"])
    table.rows.append(["fanout ledger item (items + payloads hashes)", "-",
                       f"{ledger_per_item:,.0f}", "-"])
    result.tables.append(table)
    rss_table = Table(f"Worker RSS after the harvest ({rss['source']})",
                      ["contender", "workers", "RSS MiB (all processes)"])
    for name, (label, value) in rss["rss"].items():
        rss_table.rows.append([name, label, fmt_mib(value)])
    result.tables.append(rss_table)
    in_flight = in_flight_rss(ctx)
    result.figures["worker_rss_in_flight"] = in_flight
    flight_table = Table(
        f"One fanout worker process ({in_flight['threads']} threads), its calls of the async "
        f"demo leaf waiting on a {in_flight['vendor_latency_ms']} ms vendor",
        ["bound (--max-in-flight)", "calls in flight", "RSS MiB (its processes)"],
        caption=f"per call in flight: {in_flight['bytes_per_call_in_flight'] / 1024:,.1f} KiB "
                "(the RSS difference / the calls' difference)",
    )
    for point in (in_flight["low"], in_flight["high"]):
        flight_table.rows.append([f"{point['bound']:,}", f"{point['in_flight']:,}",
                                  fmt_mib(point["rss_bytes"])])
    result.tables.append(flight_table)
    return result


def _worker_rss(ctx: Context) -> dict[str, Any]:
    """{contender: (worker settings, bytes)} from this invocation's harvest, or a small one."""
    from benchmarks.harvest import MAIN_CONFIG, QUICK_SHAPE, FanoutHarness, measure

    harvest = ctx.results.get("harvest")
    if harvest is not None and harvest.figures.get("measurements"):
        rss = {}
        for name, m in harvest.figures["measurements"].items():
            if m.get("worker_rss_bytes"):
                rss[name] = (m["config"]["label"], m["worker_rss_bytes"])
        return {"rss": rss, "source": "harvest suite, this invocation"}
    ctx.log("  no harvest in this invocation: a small fanout harvest for the worker RSS")
    m = measure(ctx, FanoutHarness(), QUICK_SHAPE, MAIN_CONFIG, label="memory-rss")
    return {"rss": {"fanout": (MAIN_CONFIG.label, m.worker_rss_bytes)},
            "source": f"fanout harvest of {QUICK_SHAPE.label} run by this suite"}
