"""The ``fanout`` commands that talk to a run or its Redis: demo, run, status, failures,
replay, cancel, dead-letters, limits, cache."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from producers import limits_cli, processes
from producers.config_file import run_defaults
from producers.errors import RunFinished, RunNotFound, UsageError
from producers.interrupts import Interrupted, stop_signals_raise
from producers.items import read_items
from producers.local import LocalSystem, local_system
from producers.report import RedisGone, done_count, exit_code, summary_table, wait_for_run
from producers.trigger import (
    new_run_id,
    replay_run,
    root_stage_of,
    stage_order,
    start_run,
)
from workers.api import get_pipeline
from workers.connections import (
    check_reachable,
    resolve_broker_url,
    resolve_redis_url,
)
from workers.engine import cache_hook
from workers.engine.services import services
from workers.ledger import Ledger, LedgerError, RunSnapshot
from workers.outage import DOWN_ERRORS
from workers.redact import redact
from workers.settings import ConfigError, get_settings
from workers.sinks import check_sink, check_sink_url
from workers.transport import check_broker


def make_console(*, stderr: bool = False) -> Console:
    """A console for summaries; piped to a file or a CI log it is 120 columns wide, so the
    summary table's eight columns are not cut (rich assumes 80)."""
    console = Console(stderr=stderr)
    if not console.is_terminal:
        console.width = 120
    return console


def _connect(*, sink: bool = False) -> str:
    """Resolve Redis (starting the embedded one if needed) and fail in one line if it is down.
    ``sink``: open the sink too (a command that starts a run): one that cannot be opened, for
    good or for now, is one line and exit 2 instead of a run that stands still."""
    url = resolve_redis_url()
    check_reachable(url)
    os.environ["FANOUT_REDIS_URL"] = url  # children and this process agree on one server
    settings = get_settings()
    check_broker(resolve_broker_url(settings))
    check_sink_url(settings.sink_url)
    if sink:
        check_sink(settings.sink_url)
    return url


_FAILURES_SHOWN = 5


def _ledger() -> Ledger:
    return services().ledger


def _finish(snap: RunSnapshot, *, as_json: bool, console: Console) -> int:
    console.print(summary_table(snap))
    if snap.stop_reason:
        console.print(f"{snap.status}: {snap.stop_reason}", markup=False)
    if snap.failed_items:
        failures = sorted(_ledger().view.failures(snap.run_id).items())
        for item, failure in failures[:_FAILURES_SHOWN]:
            console.print(f"failed {failure['stage']} {item}: {failure['error_type']}: "
                          f"{failure['message']}")
        if len(failures) > _FAILURES_SHOWN:
            console.print(f"... and {len(failures) - _FAILURES_SHOWN} more: "
                          f"fanout failures {snap.run_id}")
    if as_json:
        print(json.dumps(snap.summary()), flush=True)
    return exit_code(snap.status)


def demo(args: argparse.Namespace) -> int:
    """Embedded Redis + the demo vendor + workers + one run, with progress and a summary.
    SIGINT or SIGTERM cancels the run and stops what the demo started (one line, 130/143)."""
    console = make_console(stderr=args.json)
    vendor_options = [
        "--accounts", str(args.accounts), "--services", str(args.services),
        "--latency-ms", str(args.latency_ms), "--error-rate", str(args.error_rate),
    ]
    concurrency = args.concurrency or processes.DEFAULT_CONCURRENCY
    run_id = new_run_id()  # known before the run starts, so an interrupt can cancel it
    outcome = "no run started"
    try:
        with stop_signals_raise(), local_system(vendor_options=vendor_options,
                                                concurrency=concurrency,
                                                max_in_flight=args.max_in_flight,
                                                worker_processes=args.processes) as system:
            try:
                snap = _demo_run(args, system, run_id, console)
            except Interrupted as stop:
                outcome = _cancel_demo_run(run_id, stop)  # before its workers stop
                raise
    except Interrupted as stop:
        print(f"fanout demo: interrupted ({stop.name}): {outcome}, workers and vendor stopped",
              file=sys.stderr, flush=True)
        if args.json:
            _print_last_json(run_id, "demo", f"fanout demo interrupted ({stop.name})")
        return stop.exit_code
    return _finish(snap, as_json=args.json, console=console)


def _demo_run(args: argparse.Namespace, system: LocalSystem, run_id: str,
              console: Console) -> RunSnapshot:
    # One line, never wrapped: each URL works pasted back (FANOUT_SINK_URL=...).
    console.print(f"demo vendor at {system.vendor_url} · Redis at "
                  f"{redact(system.redis_url)} · sink {redact(system.sink_url)}",
                  soft_wrap=True, markup=False)
    params = {"days": args.days, "vendor_url": system.vendor_url}
    start_run("demo", params, run_id=run_id)
    console.print(f"run {run_id}: {args.accounts} accounts x {args.services} services x "
                  f"{args.days} days = {args.accounts * args.services * args.days} metric-days")
    order = get_pipeline("demo").stage_order()
    return wait_for_run(_ledger(), run_id, order, console=console)


def _cancel_demo_run(run_id: str, stop: Interrupted) -> str:
    """Cancel the demo's run in the ledger; what became of it, for the one line."""
    try:
        skipped = _ledger().runs.stop(run_id, "cancelled",
                                      f"fanout demo interrupted ({stop.name})")
    except LedgerError:  # interrupted before the run was created
        return "no run started"
    return f"run {run_id} cancelled" if skipped >= 0 else f"run {run_id} had already finished"


def replay(args: argparse.Namespace) -> int:
    _connect(sink=True)
    count = replay_run(args.run_id, stage=args.stage, item=args.item)
    console = make_console(stderr=True)
    console.print(f"replaying {count} failed items of run {args.run_id}")
    if not args.wait:
        return 0
    return _wait_and_finish(args, args.run_id, console)


def run(args: argparse.Namespace) -> int:
    # The pipeline's batch map defaults ([pipelines.NAME] in the config file) under the flags.
    batch = run_defaults(args.pipeline).fill(args.batch_size, args.kill_switch, args.per_item)
    if not batch and (args.kill_switch is not None or args.per_item):
        raise UsageError("--kill-switch and --per-item need --batch-size (or batch_size in "
                         f"[pipelines.{args.pipeline}])")
    if batch.get("per_item") and batch["kill_switch"] is None:
        raise UsageError("--per-item needs --kill-switch")
    pipeline = get_pipeline(args.pipeline)
    roots, root_stage = None, None
    if args.items is None:
        if args.root_stage is not None:
            raise UsageError("--root-stage needs --items (it names the stage they go to)")
        if pipeline.list_roots is None:
            raise UsageError(f"pipeline {pipeline.name!r} has no roots function: give its "
                             "root items with --items FILE (JSON lines or a JSON array; - "
                             "reads stdin)")
    else:
        # Read and checked before anything connects: bad input costs no run.
        root_stage = root_stage_of(pipeline, args.root_stage)
        roots = read_items(args.items)
    _connect(sink=True)
    params: dict[str, Any] = dict(args.param)
    for key in ("days", "end_day", "vendor_url"):
        value = getattr(args, key)
        if value is not None:
            params[key] = value
    run_id = start_run(args.pipeline, params, roots=roots, root_stage=root_stage,
                       priority=args.priority, **batch)
    console = make_console(stderr=True)
    if not args.wait:
        print(run_id)
        return 0
    console.print(f"run {run_id} started")
    return _wait_and_finish(args, run_id, console, pipeline=args.pipeline,
                            order=stage_order(pipeline, root_stage))


def _wait_and_finish(
    args: argparse.Namespace, run_id: str, console: Console, pipeline: str | None = None,
    order: list[str] | None = None,
) -> int:
    """Wait for the run and print how it ended. ``pipeline`` (and the ``order`` of its
    stages): known to the caller (``run``), so nothing is read from Redis before the wait,
    which rides out an outage. SIGINT or SIGTERM stops the wait, not the run: one line says
    so, exit 130/143."""
    if pipeline is None:
        pipeline = _snapshot(run_id).pipeline
    if order is None:
        order = get_pipeline(pipeline).stage_order()
    show = None if args.json or not sys.stderr.isatty() else console
    try:
        with stop_signals_raise():
            snap = wait_for_run(_ledger(), run_id, order, console=show, timeout_s=args.timeout)
    except Interrupted as stop:
        print(f"fanout: stopped waiting ({stop.name}): run {run_id} goes on in the workers; "
              f"watch it with: fanout status {run_id} --watch", file=sys.stderr, flush=True)
        if args.json:
            _print_last_json(run_id, pipeline, f"stopped waiting ({stop.name}): the run goes "
                                               "on in the workers")
        return stop.exit_code
    except RedisGone as gone:  # the line is printed; the JSON still comes last
        if args.json:
            summary = gone.last.summary() if gone.last else {
                "run_id": run_id, "pipeline": pipeline, "status": "unknown"}
            summary["error"] = (f"Redis unreachable for {gone.down_for_s:.0f} s: stopped "
                                "waiting (the run goes on once Redis is back)")
            print(json.dumps(summary), flush=True)
        return 1
    if not snap.finished:
        console.print(f"run {run_id} still {snap.status} after {args.timeout}s")
        if args.json:
            print(json.dumps(snap.summary()), flush=True)
        return 1
    return _finish(snap, as_json=args.json, console=console)


def _print_last_json(run_id: str, pipeline: str, error: str) -> None:
    """The JSON summary of a run a signal stopped the wait for, as it is now, with ``error``
    (the JSON comes last, as it does when a wait gives up on an outage)."""
    try:
        snap = _ledger().view.snapshot(run_id, get_pipeline(pipeline).stage_order())
    except DOWN_ERRORS:
        snap = None
    summary = snap.summary() if snap else {"run_id": run_id, "pipeline": pipeline,
                                           "status": "unknown"}
    summary["error"] = error
    print(json.dumps(summary), flush=True)


def _snapshot(run_id: str | None) -> RunSnapshot:
    ledger = _ledger()
    run_id = run_id or ledger.view.latest_run()
    if run_id is None:
        raise RunNotFound("no runs yet")
    snap = ledger.view.snapshot(run_id)
    if snap is None:
        raise RunNotFound(f"run {run_id} is unknown or expired")
    try:
        order = get_pipeline(snap.pipeline).stage_order()
    except ConfigError:  # a pipeline this process does not load: counters in ledger order
        return snap
    return ledger.view.snapshot(run_id, order) or snap


def status(args: argparse.Namespace) -> int:
    _connect()
    if args.run_id is None and not args.watch:
        return _list_runs(as_json=args.json)
    snap = _snapshot(args.run_id)
    if args.watch and not snap.finished:
        console = make_console(stderr=True)
        order = snap.stage_order or list(snap.stages)
        snap = wait_for_run(_ledger(), snap.run_id, order, console=console)
    if args.json:
        print(json.dumps(snap.summary()))
    else:
        console = make_console()
        console.print(summary_table(snap))
        if snap.stop_reason:
            console.print(f"{snap.status}: {snap.stop_reason}", markup=False)
    return exit_code(snap.status) if snap.finished else 0


RECENT_RUNS = 20


def _list_runs(*, as_json: bool) -> int:
    """The latest runs: status, progress (terminal items of all registered), age, wall."""
    ledger = _ledger()
    rows: list[dict[str, Any]] = []
    for run_id in ledger.view.recent_runs(RECENT_RUNS):
        snap = ledger.view.snapshot(run_id)
        if snap is None:
            continue
        enqueued = sum(c.get("enqueued", 0) for c in snap.stages.values())
        done = sum(done_count(c) for c in snap.stages.values())
        rows.append({"run_id": run_id, "pipeline": snap.pipeline, "status": snap.status,
                     "done": done, "enqueued": enqueued,
                     "age_s": round(time.time() - snap.created_at, 1), "wall_s": snap.wall_s})
    if as_json:
        print(json.dumps(rows))
        return 0
    table = Table(title=f"the latest {len(rows)} runs (fanout status RUN for one)")
    for column in ("run", "pipeline", "status", "progress", "age", "wall s"):
        table.add_column(column, justify="right" if column in ("age", "wall s") else "left")
    for row in rows:
        share = f"{row['done']}/{row['enqueued']}"
        table.add_row(row["run_id"], row["pipeline"], row["status"], share,
                      _age(row["age_s"]), f"{row['wall_s']:.1f}")
    make_console().print(table)
    return 0


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def results(args: argparse.Namespace) -> int:
    """What each root item of a run returned, in the order the roots were given: JSON lines
    (which ``fanout run --items -`` reads), or one JSON array with ``--json``."""
    _connect()
    snap = _snapshot(args.run_id)
    values = _ledger().view.results(snap.run_id)
    if args.json:
        print(json.dumps(values))
    else:
        for value in values:
            print(json.dumps(value))
    return 0


def failures(args: argparse.Namespace) -> int:
    _connect()
    snap = _snapshot(args.run_id)
    failed = _ledger().view.failures(snap.run_id)
    if args.json:
        print(json.dumps(failed))
        return 0
    console = make_console()
    for item, failure in sorted(failed.items()):
        console.print(f"{failure['stage']} {item} {failure['error_type']}: {failure['message']} "
                      f"({describe_attempts(failure)}) {json.dumps(failure['item'])}",
                      markup=False, soft_wrap=True)
        where = raised_at(failure.get("traceback", ""))
        if where:
            console.print(f"  raised at {where}", markup=False, soft_wrap=True)
    console.print(f"{len(failed)} failed items in run {snap.run_id}")
    return 0


def describe_attempts(failure: dict[str, Any]) -> str:
    """How often the item was tried. A try is counted per attempt, or per HTTP call when an
    attempt made several (the vendor client's own retries), so more tries than attempts
    means HTTP retries; the same number says nothing of HTTP and is not shown."""
    attempts = failure["attempts"]
    tries = failure.get("tries", attempts)
    if tries > attempts:
        return f"attempts {attempts}, {tries} tries counting HTTP retries"
    return f"attempts {attempts}"


def raised_at(traceback_text: str) -> str:
    """Where a traceback's innermost frame is (``file:line in function``), or ""."""
    frames = [line.strip() for line in traceback_text.splitlines()
              if line.startswith('  File "')]
    if not frames:
        return ""
    # '  File "PATH", line N, in FUNC'
    path, _, rest = frames[-1].removeprefix('File "').partition('", line ')
    line, _, function = rest.partition(", in ")
    return f"{path}:{line} in {function}"


def dead_letters(args: argparse.Namespace) -> int:
    _connect()
    store = services().dead_letters
    if args.action == "purge":
        print(f"purged {store.purge()} dead letters")
        return 0
    letters = store.list()
    if args.json:
        print(json.dumps([letter.as_json() for letter in letters]))
        return 0
    console = make_console()
    for letter in letters:
        console.print(f"{letter.queue}: {letter.reason}: {letter.raw[:120]!r}", markup=False)
    console.print(f"{len(letters)} dead letters")
    return 0


def limits(args: argparse.Namespace) -> int:
    _connect()
    return limits_cli.run(args, make_console())


def cache(args: argparse.Namespace) -> int:
    """Forget cached results: all, a pipeline's (``PIPELINE``) or a stage's
    (``PIPELINE.STAGE``)."""
    target = args.target
    tasks: list[str | None] = [None]
    if target is not None:
        name, dot, stage = target.partition(".")
        pipeline = get_pipeline(name)
        if dot and stage not in pipeline.stages:
            raise ConfigError(f"pipeline {name!r} has no stage {stage!r} (give PIPELINE or "
                              f"PIPELINE.STAGE; stages: {', '.join(pipeline.stages)})")
        tasks = [target] if dot else [s.task_name for s in pipeline.stages.values()]
    _connect()
    client = services().ledger.redis
    removed = sum(cache_hook.clear(client, task) for task in tasks)
    print(f"cleared {removed} cached results" + (f" of {target}" if target else ""))
    return 0


def cancel(args: argparse.Namespace) -> int:
    _connect()
    snap = _snapshot(args.run_id)
    skipped = _ledger().runs.stop(snap.run_id, "cancelled", "cancelled by hand")
    if skipped < 0:
        raise RunFinished(f"run {snap.run_id} already finished ({snap.status})")
    print(f"run {snap.run_id} cancelled: {skipped} items skipped now, the ones in flight "
          "as workers take them")
    return 0
