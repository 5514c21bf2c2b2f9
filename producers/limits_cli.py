"""``fanout limits set|list|delete|apply``: global limits, managed like ``prefect gcl``;
``apply`` creates or replaces those of the config file (``[limits.NAME]``)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console
from rich.table import Table

from producers.config_file import config_path, load_limits
from workers.connections import get_redis
from workers.limits import LimitConfig, Limits, UnknownLimit
from workers.settings import ConfigError


def add_parser(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    limits = sub.add_parser("limits", help="global rate and concurrency limits, shared by "
                            "every worker")
    actions = limits.add_subparsers(dest="limits_command", required=True,
                                    parser_class=parser_class, metavar="COMMAND",
                                    title="commands")
    set_ = actions.add_parser("set", help="create or replace a limit (a rate, a concurrency, "
                              "or both)")
    set_.add_argument("name", metavar="NAME",
                      help="the limit's name, as stages give it (limits=[NAME]) or "
                           "rate_limit(NAME) calls it; used per key (per_key(NAME, ...), "
                           "limit=(NAME, key)), it is the template every key gets")
    set_.add_argument("--rate", default=None, metavar="RATE",
                      help="calls per period, e.g. 60/h, 10/s, 100/15m, or 'auto': found from "
                           "the vendor's 429s (AIMD) (default: no rate)")
    set_.add_argument("--ceiling", default=None, metavar="RATE",
                      help="with --rate auto: the highest rate it tries (default: 1000/s)")
    set_.add_argument("--floor", default=None, metavar="RATE",
                      help="with --rate auto: the lowest rate it cuts to (default: 1/s)")
    set_.add_argument("--burst", type=int, default=None, metavar="N",
                      help="with --rate: calls that may pass at once (default: 1)")
    set_.add_argument("--concurrency", type=int, default=None, metavar="N",
                      help="calls in flight at most (default: no bound)")
    list_ = actions.add_parser("list", help="every limit, its use and its current wait (a "
                               "limit used per key: each key in use, under it)")
    list_.add_argument("--json", action="store_true", help="print them as JSON")
    delete = actions.add_parser("delete", help="remove a limit")
    delete.add_argument("name", metavar="NAME", help="the limit's name")
    actions.add_parser("apply", help="create or replace the limits of the config file "
                                     "(FANOUT_CONFIG or ./fanout.toml, [limits.NAME] tables)")


def run(args: argparse.Namespace, console: Console) -> int:
    if args.limits_command == "apply":
        return _apply(console)
    limits = Limits(get_redis())
    try:
        if args.limits_command == "set":
            config = limits.set_limit(args.name, rate=args.rate, burst=args.burst,
                                      concurrency=args.concurrency, ceiling=args.ceiling,
                                      floor=args.floor)
            described = _describe(config)
            console.print(f"limit {config.name}: {described}")
            return 0
        if args.limits_command == "delete":
            if not limits.delete_limit(args.name):
                raise ConfigError(f"no limit named {args.name!r}")
            console.print(f"limit {args.name} deleted")
            return 0
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    rows = []
    for config in limits.list_limits():
        try:
            status = limits.status(config.name)
            keys = [{"key": key, **_use(limits.status((config.name, key)))}
                    for key in limits.keys_in_use(config.name)]
        except UnknownLimit:  # deleted meanwhile
            continue
        auto = {} if config.auto is None else {
            "floor": str(config.auto.floor), "ceiling": str(config.auto.ceiling)}
        rows.append({
            "name": config.name, "rate": config.describe_rate(),
            "burst": config.burst if config.has_rate else None,
            "concurrency": config.concurrency, **auto, **_use(status), "keys": keys,
        })
    if args.json:
        print(json.dumps(rows))
        return 0
    table = Table(title="limits")
    for column in ("name", "rate", "burst", "concurrency", "in use", "wait s"):
        table.add_column(column)
    for row in rows:
        shown = {**row, "rate": f"auto, now {row['rate_now']}/s"} if "rate_now" in row else row
        table.add_row(*(str(shown[k] if shown[k] is not None else "-") for k in
                        ("name", "rate", "burst", "concurrency", "in_use", "wait_s")))
        for key in row["keys"]:  # a limit used per key: each key in use, under it
            now = f"now {key['rate_now']}/s" if "rate_now" in key else ""
            table.add_row(f"  key {key['key']}", now, "", "", str(key["in_use"]),
                          str(key["wait_s"]))
    console.print(table)
    return 0


def _use(status: dict[str, float]) -> dict[str, Any]:
    rate_now = {"rate_now": status["rate_now"]} if "rate_now" in status else {}
    return {**rate_now, "in_use": int(status["in_use"]), "wait_s": status["wait_s"]}


def _apply(console: Console) -> int:
    """Every limit of the config file, checked before any is written."""
    configs = load_limits()
    if not configs:
        where = config_path() or "no config file (FANOUT_CONFIG or ./fanout.toml)"
        raise ConfigError(f"no [limits.NAME] tables in {where}")
    limits = Limits(get_redis())
    for config in configs:
        auto = config.auto
        limits.set_limit(config.name, rate="auto" if auto is not None else config.rate,
                         burst=config.burst if config.has_rate else None,
                         concurrency=config.concurrency,
                         ceiling=auto.ceiling if auto is not None else None,
                         floor=auto.floor if auto is not None else None)
        console.print(f"limit {config.name}: {_describe(config)}")
    return 0


def _describe(config: LimitConfig) -> str:
    parts = [f"rate {config.rate}, burst {config.burst}"] if config.rate is not None else []
    if config.auto is not None:
        parts = [f"rate auto ({config.auto.floor} to {config.auto.ceiling}), "
                 f"burst {config.burst}"]
    if config.concurrency is not None:
        parts.append(f"concurrency {config.concurrency}")
    return "; ".join(parts)
