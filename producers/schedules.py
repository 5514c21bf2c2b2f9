"""``fanout beat``, ``fanout schedules [--json]`` and ``fanout schedules run NAME``: the
command line of the schedules in the config file (``scheduling.py``; the beat: ``beat.py``)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from producers.beat import FanoutScheduler, SlotStore, store_from_settings
from producers.beat_reload import load_beat_config
from producers.config_file import run_defaults
from producers.errors import CliError
from producers.report import exit_code, summary_table, wait_for_run
from producers.scheduling import (
    UTC,
    Schedule,
    config_path,
    grace_s,
    lease_s,
    load_schedules,
)
from producers.trigger import stage_order, start_run
from workers.api import get_pipeline
from workers.app import create_app
from workers.connections import check_reachable, resolve_redis_url
from workers.engine.services import services
from workers.ledger import RunSnapshot
from workers.settings import ConfigError


def add_parsers(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    """Register ``beat`` and ``schedules``; each sets ``schedule_handler``, which the CLI's
    dispatch calls."""
    beat = sub.add_parser("beat", help="run Celery beat over the schedules in the config file "
                          "(FANOUT_CONFIG or ./fanout.toml)")
    beat.add_argument("--loglevel", default="INFO", metavar="LEVEL",
                      help="DEBUG, INFO, WARNING or ERROR (default: %(default)s)")
    beat.set_defaults(schedule_handler=beat_command)

    schedules = sub.add_parser("schedules", help="list the schedules of the config file, or "
                               "run one now")
    schedules.add_argument("--json", action="store_true", help="print the list as JSON")
    schedules.set_defaults(schedule_handler=list_command)
    actions = schedules.add_subparsers(dest="schedules_command", parser_class=parser_class,
                                       metavar="COMMAND", title="commands (default: list)")
    listing = actions.add_parser("list", help="list the schedules (the default)")
    listing.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                         help="print the list as JSON")
    run = actions.add_parser("run", help="trigger a schedule's pipeline now (its run id ends "
                             "in -manual)")
    run.add_argument("name", metavar="NAME", help="the schedule's name ([schedules.NAME])")
    run.add_argument("--wait", action="store_true",
                     help="wait for the run to finish and show its summary (default: print "
                          "the run id and return)")
    run.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                     help="with --wait: stop waiting after this many seconds, exit 1 "
                          "(default: no limit)")
    run.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                     help="with --wait: print the JSON summary as the last line of stdout")
    run.set_defaults(schedule_handler=run_command)


def _schedules() -> list[Schedule]:
    schedules = load_schedules()
    if not schedules:
        where = config_path() or "FANOUT_CONFIG or ./fanout.toml"
        raise ConfigError(f"no schedules in {where} (see README, Schedules)")
    return schedules


def _connect() -> None:
    url = resolve_redis_url()
    check_reachable(url)
    os.environ["FANOUT_REDIS_URL"] = url  # the Celery app and this process agree


def beat_command(args: argparse.Namespace) -> int:
    """Celery beat in this process: it starts the runs itself (it is a producer)."""
    _schedules()  # a bad config file: one line, before anything starts
    load_beat_config()  # ...whichever section it is in
    grace_s(), lease_s()
    _connect()
    app = create_app()
    app.Beat(scheduler=FanoutScheduler, loglevel=args.loglevel).run()
    return 0


def _status(store: SlotStore, schedule: Schedule) -> dict[str, Any]:
    last = store.last_run(schedule.name)
    error = store.last_error(schedule.name)
    status = None
    if last is not None:
        snap = services().ledger.view.snapshot(last[0])
        status = snap.status if snap is not None else "expired"
    if error is not None and (last is None or dt.datetime.fromisoformat(error["slot"])
                              .timestamp() > last[1]):
        status = "error"
    else:
        error = None
    return {"last_run_id": last[0] if last else None, "last_status": status,
            "last_error": error["message"] if error else None}


def list_command(args: argparse.Namespace) -> int:
    schedules = load_schedules()
    _connect()
    store = store_from_settings()
    now = dt.datetime.now(UTC)
    rows = [_row(store, schedule, now) for schedule in schedules]
    if args.json:
        print(json.dumps(rows))
        return 0
    table = Table(title=f"schedules ({config_path() or 'no config file'})")
    for column in ("name", "when", "tz", "pipeline", "enabled", "next fire", "last run",
                   "status"):
        table.add_column(column)
    for schedule, row in zip(schedules, rows, strict=True):
        next_at = row["next_fire_at"]
        status = row["last_status"] or "-"
        if row["last_error"]:
            status = f"error: {row['last_error']}"
        table.add_row(schedule.name, schedule.when, schedule.tz, schedule.pipeline,
                      "yes" if schedule.enabled else "no",
                      _local(next_at, schedule.zone) if next_at else "-",
                      row["last_run_id"] or "-", status)
    console = Console()
    if not console.is_terminal:
        console.width = 160
    console.print(table)
    return 0


def _row(store: SlotStore, schedule: Schedule, now: dt.datetime) -> dict[str, Any]:
    at = schedule.next_slot(now) if schedule.enabled else None
    return {
        "name": schedule.name, "cron": schedule.cron, "every_s": schedule.every_s,
        "tz": schedule.tz, "pipeline": schedule.pipeline, "params": dict(schedule.params),
        "items_count": None if schedule.items is None else len(schedule.items),
        "items_file": schedule.items_file, "root_stage": schedule.root_stage,
        "enabled": schedule.enabled,
        "next_fire_at": at.isoformat() if at else None,
        "next_fire_local": at.astimezone(schedule.zone).isoformat() if at else None,
        **_status(store, schedule),
    }


def _local(at: str, zone: dt.tzinfo) -> str:
    return dt.datetime.fromisoformat(at).astimezone(zone).strftime("%Y-%m-%d %H:%M:%S %Z")


def run_command(args: argparse.Namespace) -> int:
    schedules = {s.name: s for s in _schedules()}
    schedule = schedules.get(args.name)
    if schedule is None:
        raise CliError(f"unknown schedule {args.name!r} (configured: "
                       f"{', '.join(sorted(schedules))})")
    _connect()
    now = dt.datetime.now(UTC)
    run_id = start_run(schedule.pipeline, dict(schedule.params), run_id=schedule.manual_run_id(now),
                       **schedule.run_options(run_defaults(schedule.pipeline)))
    store_from_settings().record_run(schedule.name, run_id, now)
    console = Console(stderr=True)
    if not args.wait:
        print(run_id)
        return 0
    console.print(f"run {run_id} started")
    order = stage_order(get_pipeline(schedule.pipeline), schedule.root_stage)
    show = None if args.json or not sys.stderr.isatty() else console
    snap: RunSnapshot = wait_for_run(services().ledger, run_id, order, console=show,
                                     timeout_s=args.timeout)
    console.print(summary_table(snap))
    if args.json:
        print(json.dumps(snap.summary()), flush=True)
    if not snap.finished:
        return 1
    return exit_code(snap.status)
