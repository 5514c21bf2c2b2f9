"""Loop overhead: iterations per second of looping items at 0 ms vendor latency.

Every iteration is its own message (delivery, ledger advance in Lua, one vendor call,
publish of the next iteration), so this is the per-iteration cost of fanout's looping; measured
for a stage whose iterations are each a Celery task, and for one with ``batch=16``.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks.core import BenchmarkError, Context, SuiteResult, Table


def loop(ctx: Context) -> SuiteResult:
    import benchmarks.loop_pipeline  # noqa: F401  (registers the pipeline here too)
    from benchmarks.contenders import FanoutHarness, WorkerConfig
    from producers.processes import DEFAULT_CONCURRENCY, DEFAULT_POOL, default_processes

    items, iterations = (20, 25) if ctx.quick else (50, 100)
    config = WorkerConfig(default_processes(), DEFAULT_POOL, DEFAULT_CONCURRENCY)
    env = ctx.env
    env.flush()
    vendor = env.vendor_handle
    vendor.configure(latency_ms=0)
    suite_dir = env.suite_dir("loop")
    harness = FanoutHarness({"FANOUT_PIPELINES": "benchmarks.loop_pipeline"})
    procs = harness.start(env, config, suite_dir)
    total = items * iterations
    figures: dict[str, Any] = {"items": items, "iterations_each": iterations}
    rows = [["looping items x iterations", f"{items} x {iterations} = {total:,}"],
            ["workers", config.label]]
    try:
        harness.wait_ready(procs, suite_dir, 60)
        for stage in ("count", "count_batched"):
            per_s, wall_s = _measure(vendor, stage, items, iterations)
            figures[f"{stage}_iterations_per_s"] = round(per_s, 1)
            figures[f"{stage}_wall_s"] = round(wall_s, 3)
            rows.append([f"iterations/s, {stage}", f"{per_s:,.0f}"])
    finally:
        env.stop_processes(procs)
        vendor.configure(latency_ms=env.latency_ms)
    table = Table("Loop overhead (0 ms vendor latency)", ["what", "value"], rows)
    return SuiteResult("loop", settings={"items": items, "iterations": iterations,
                                         "processes": config.processes,
                                         "concurrency": config.concurrency},
                       figures=figures, tables=[table])


def _measure(vendor: Any, stage: str, items: int, iterations: int) -> tuple[float, float]:
    """(iterations/s, wall s) of ``items`` looping items of ``stage``, verified."""
    from producers.trigger import start_run
    from workers.engine.services import services

    vendor.reset()
    started = time.perf_counter()
    run_id = start_run("benchloop", {"vendor_url": vendor.url}, roots=[iterations] * items,
                       root_stage=stage)
    status = services().ledger.view.wait(run_id, 600)
    wall_s = time.perf_counter() - started
    snap = services().ledger.view.snapshot(run_id)
    total = items * iterations
    calls = vendor.stats()["by_endpoint"]["fib"]
    if status != "succeeded" or snap is None or snap.stages[stage].get("iterations") != total:
        raise BenchmarkError(f"loop run {run_id} ended {status}: {snap and snap.stages}")
    if calls != total:
        raise BenchmarkError(f"the vendor saw {calls} calls for {total} iterations")
    return total / wall_s, wall_s
