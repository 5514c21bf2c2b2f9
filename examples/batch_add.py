"""Seed 003, prefecto's BatchTask, on fanout: map ``add`` over pairs in batches of 2.

    python examples/batch_add.py          # [3, 5, 7, 9]
    python examples/batch_add.py --kill   # b = [1, '2', 3, 4]: the first batch fails, the
                                          # kill switch stops the run, batch 2 never runs

Batch 2 is published only when every item of batch 1 is done, by the worker that finished
the last of them, and only if the kill switch (``AnyFailed()``) did not trip. Unlike
prefecto, the switch is also checked after the last batch. The script starts what it needs:
the embedded Redis (or FANOUT_REDIS_URL), and a worker that imports this file's pipeline.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from workers.api import Pipeline, StageContext
from workers.policy.kill_switch import AnyFailed

flow = Pipeline("batch_add")


@flow.stage("add")
def add(ctx: StageContext, pair: list[Any]) -> Any:
    a, b = pair
    return a + b


def main(argv: list[str]) -> int:
    from producers.local import local_system
    from producers.trigger import start_run
    from workers.engine.services import services

    kill = argv == ["--kill"]
    if argv and not kill:
        print("usage: batch_add.py [--kill]", file=sys.stderr)
        return 2
    a, b = [1, 2, 3, 4], ([1, "2", 3, 4] if kill else [2, 3, 4, 5])
    here = str(Path(__file__).resolve().parent)
    with local_system(pipelines=["batch_add"], pythonpath=[here]) as system:
        del system
        run_id = start_run("batch_add", {}, roots=[[x, y] for x, y in zip(a, b, strict=True)],
                           root_stage="add", batch_size=2, kill_switch=AnyFailed())
        ledger = services().ledger
        status = ledger.view.wait(run_id, timeout_s=120)
        snap = ledger.view.snapshot(run_id)
    if status != "succeeded" or snap is None:
        reason = snap.stop_reason if snap and snap.stop_reason else f"fanout failures {run_id}"
        print(f"run {run_id} ended {status}: {reason}", file=sys.stderr)
        return 1
    print(ledger.view.results(run_id))
    return 0


if __name__ == "__main__":
    from producers.local import run_example

    raise SystemExit(run_example(main))
