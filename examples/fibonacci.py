"""Seed 002, Prefect 1's task looping, on fanout: the largest Fibonacci number below M.

Fibonacci numbers are a black box behind an API (the demo vendor's ``/fib/{n}``); each call
is one loop iteration, its own message with its own retries. A failed iteration is retried
alone: the iterations before it are never run again. The stage is an ``async def``: the
iterations of many Ms (each its own message) wait for the API together on the worker's event
loop, not one per thread.

    python examples/fibonacci.py 100                 # 89
    python examples/fibonacci.py 10 100 1000 1500    # [8, 89, 987, 987]

The script starts what it needs: the embedded Redis (or FANOUT_REDIS_URL), the demo vendor,
and a worker that imports this file's pipeline.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from workers.api import Loop, Pipeline, StageContext
from workers.http import request_json_async

flow = Pipeline("fibonacci")


@flow.stage("compute_large_fibonacci", retries=5, retry_delay_s=2)
async def compute_large_fibonacci(ctx: StageContext, M: int) -> Any:
    # The accumulated payload of the previous iteration (Prefect: task_loop_result).
    payload = ctx.loop.payload or {}
    n = payload.get("n", 1)
    fib = payload.get("fib", 1)

    answer = await request_json_async("GET", f"{ctx.params['vendor_url']}/fib/{n}", retries=0)
    next_fib = answer["value"]

    if next_fib > M:
        return fib  # a plain return ends the loop

    raise Loop({"n": n + 1, "fib": next_fib}, message=f"Fib {n}={next_fib}")


def main(argv: list[str]) -> int:
    from producers.local import local_system
    from producers.trigger import start_run
    from workers.engine.services import services

    try:
        ms = [int(arg) for arg in argv] or [100]
    except ValueError:
        print("usage: fibonacci.py M [M ...]  (whole numbers)", file=sys.stderr)
        return 2
    here = str(Path(__file__).resolve().parent)
    with local_system(pipelines=["fibonacci"], pythonpath=[here]) as system:
        run_id = start_run("fibonacci", {"vendor_url": system.vendor_url},
                           roots=ms, root_stage="compute_large_fibonacci")
        status = services().ledger.view.wait(run_id, timeout_s=300)
    if status != "succeeded":
        print(f"run {run_id} ended {status}: fanout failures {run_id}", file=sys.stderr)
        return 1
    results = services().ledger.view.results(run_id)
    print(results[0] if len(ms) == 1 else results)
    return 0


if __name__ == "__main__":
    from producers.local import run_example

    raise SystemExit(run_example(main))
