"""The ``fanout`` command line. Bad input: one line on stderr and exit code 2, no traceback."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, NoReturn

from kombu.exceptions import OperationalError

from demo_vendor.__main__ import main as vendor_main
from producers import catalog, commands, limits_cli, processes, schedules, scheduling
from producers import flower as flower_cli
from producers.config_file import config_path
from producers.errors import CliError, UsageError
from producers.supervisor import supervise_workers
from producers.trigger import MAX_PRIORITY, load_configured_pipelines
from workers import embedded_redis
from workers.connections import (
    check_reachable,
    resolve_broker_url,
    resolve_redis_url,
)
from workers.outage import DOWN_ERRORS
from workers.policy import kill_switch
from workers.policy.kill_switch import Switch
from workers.settings import ConfigError, get_settings, validate_environment
from workers.transport import check_broker

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
#: Redis or the broker going away mid-command.
_LOST_ERRORS: tuple[type[BaseException], ...] = (*DOWN_ERRORS, OperationalError)


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _priority(text: str) -> int:
    """A run's priority: 1 to ``trigger.MAX_PRIORITY``."""
    value = _positive_int(text)
    if value > MAX_PRIORITY:
        raise argparse.ArgumentTypeError(f"must be <= {MAX_PRIORITY}, got {value}")
    return value


def _up_to_5000(text: str) -> int:
    """A worker's threads or calls in flight per process: 1 to 5,000."""
    value = _positive_int(text)
    if value > processes.MAX_PER_PROCESS:
        raise argparse.ArgumentTypeError(
            f"must be at most {processes.MAX_PER_PROCESS:,} per process, got {value}")
    return value


def _kill_switch(text: str) -> Switch:
    try:
        return kill_switch.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _rate(text: str) -> float:
    value = _non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def build_parser() -> Parser:
    """The whole command line; every option says what it does and its default (the docs'
    CLI reference is generated from this parser)."""
    parser = Parser(prog="fanout", description="Harvest vendor APIs with Celery and Redis. "
                    "`fanout COMMAND --help` tells more of each command.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser,
                                metavar="COMMAND", title="commands")

    demo = sub.add_parser("demo", help="run the whole system on this machine, once: Redis, "
                          "the demo vendor, workers and one run of the demo pipeline")
    demo.add_argument("--accounts", type=_positive_int, default=5, metavar="N",
                      help="accounts the demo vendor serves (default: %(default)s)")
    demo.add_argument("--services", type=_positive_int, default=10, metavar="N",
                      help="services per account (default: %(default)s)")
    demo.add_argument("--days", type=_positive_int, default=7, metavar="N",
                      help="days of metrics per service, ending yesterday (default: "
                           "%(default)s)")
    demo.add_argument("--latency-ms", type=_non_negative_float, default=20.0, metavar="MS",
                      help="the vendor's added latency per request, in ms (default: "
                           "%(default)s)")
    demo.add_argument("--error-rate", type=_rate, default=0.0, metavar="SHARE",
                      help="share of requests the vendor fails with a 5xx, 0 to 1 (default: "
                           "%(default)s)")
    demo.add_argument("--processes", type=_positive_int, default=None, metavar="N",
                      help="worker processes (default: one per core)")
    demo.add_argument("--concurrency", type=_up_to_5000, metavar="N",
                      default=processes.DEFAULT_CONCURRENCY,
                      help="threads per worker process (default: %(default)s)")
    demo.add_argument("--max-in-flight", type=_up_to_5000, default=None, metavar="N",
                      help="items of async stages in flight per worker process, together on "
                           "its event loop (default: FANOUT_MAX_IN_FLIGHT, else 1000)")
    demo.add_argument("--json", action="store_true",
                      help="print the JSON summary as the last line of stdout")

    run = sub.add_parser("run", help="trigger one run of a pipeline: its roots function "
                         "lists the root items, or --items gives them")
    run.add_argument("pipeline", metavar="PIPELINE",
                     help="the pipeline's name (fanout pipelines lists them)")
    run.add_argument("--items", metavar="FILE", default=None,
                     help="the run's root items: a JSON array, or one JSON value per line; "
                          "- reads stdin (default: the pipeline's roots function lists them)")
    run.add_argument("--root-stage", metavar="STAGE", default=None,
                     help="with --items: the stage they go to (default: the stage of the "
                          "pipeline's roots function, else its only stage no other stage "
                          "maps to)")
    run.add_argument("--days", type=_positive_int, default=None, metavar="N",
                     help="the 'days' parameter: days to harvest, ending with --end-day "
                          "(default: the pipeline's; the demo's is 7)")
    run.add_argument("--end-day", default=None, metavar="YYYY-MM-DD",
                     help="the 'end_day' parameter: last day to harvest, YYYY-MM-DD "
                          "(default: the pipeline's; the demo's is yesterday)")
    run.add_argument("--vendor-url", default=None, metavar="URL",
                     help="the 'vendor_url' parameter: the vendor API's base URL (default: "
                          "the pipeline's; the demo's is FANOUT_DEMO_VENDOR_URL, else "
                          "http://127.0.0.1:8765)")
    run.add_argument("-p", "--param", type=_key_value, action="append", default=[],
                     metavar="KEY=VALUE",
                     help="a pipeline parameter, VALUE parsed as JSON if it can be; "
                          "repeatable (default: none)")
    run.add_argument("--batch-size", type=_positive_int, default=None, metavar="N",
                     help="run the root items as a batch map, N at a time (default: all at "
                          "once)")
    run.add_argument("--kill-switch", type=_kill_switch, default=None, metavar="SWITCH",
                     help="with --batch-size: stop the run when it trips: any_failed, "
                          "failure_count:MAX, failure_rate:MIN_SAMPLE:MAX_RATE or "
                          "package.module:function (default: none)")
    run.add_argument("--per-item", action="store_true",
                     help="with --kill-switch: check it after every item, not every batch")
    run.add_argument("--priority", type=_priority, default=None, metavar="N",
                     help="the run's weight, 1 to 100, when runs share a stage's workers: "
                          "it gets N items run for each item of a priority-1 run (default: "
                          "1; runs of equal priority take turns)")
    _add_wait_options(run, "print the run id and return")

    status = sub.add_parser("status", help="the recent runs, or one run (--watch: live)")
    status.add_argument("run_id", nargs="?", metavar="RUN",
                        help=f"a run id (default: a table of the {commands.RECENT_RUNS} most "
                             "recent runs; with --watch, the latest run)")
    status.add_argument("--json", action="store_true",
                        help="print JSON: the run's summary, or a list of the recent runs")
    status.add_argument("--watch", action="store_true",
                        help="show progress per stage, rates and ETA until the run ends")

    results = sub.add_parser("results", help="what each root item of a run returned, in "
                             "the order given, as JSON lines (fanout run --items - reads them)")
    results.add_argument("run_id", metavar="RUN", help="a run id")
    results.add_argument("--json", action="store_true",
                         help="print one JSON array instead of JSON lines")

    pipelines = sub.add_parser("pipelines", help="list the pipelines fanout can import "
                               "(built-in and FANOUT_PIPELINES) with each stage's settings")
    pipelines.add_argument("--json", action="store_true", help="print them as JSON")

    failures = sub.add_parser("failures", help="list the failed items of a run")
    failures.add_argument("run_id", metavar="RUN", help="a run id")
    failures.add_argument("--json", action="store_true",
                          help="print JSON: item id -> stage, item, error, traceback, "
                               "attempts, tries")

    worker = sub.add_parser("worker", help="start worker processes under a supervisor (celery "
                            "worker with fanout defaults)")
    worker.add_argument("--processes", type=_positive_int, default=None, metavar="N",
                        help="worker processes (default: one per core)")
    worker.add_argument("--concurrency", type=_up_to_5000, metavar="N",
                        default=processes.DEFAULT_CONCURRENCY,
                        help="threads (or children) per process (default: %(default)s)")
    worker.add_argument("--max-in-flight", type=_up_to_5000, default=None, metavar="N",
                        help="items of async stages in flight per process, together on its "
                             "event loop (default: FANOUT_MAX_IN_FLIGHT, else 1000)")
    worker.add_argument("--pool", default=processes.DEFAULT_POOL,
                        choices=["threads", "prefork", "solo"],
                        help="Celery's execution pool (default: %(default)s)")
    worker.add_argument("--queues", default=None, metavar="QUEUES",
                        help="comma-separated stage queues to consume, e.g. "
                             "fanout.demo.metric_day (default: every stage's)")
    worker.add_argument("--loglevel", default="INFO", metavar="LEVEL",
                        help="DEBUG, INFO, WARNING or ERROR (default: %(default)s)")

    flower = sub.add_parser("flower", help="start Flower on the fanout broker")
    flower.add_argument("--port", type=_positive_int, default=5555, metavar="PORT",
                        help="the port to listen on (default: %(default)s)")
    flower.add_argument("--address", default="127.0.0.1", metavar="ADDRESS",
                        help="where to listen; beyond loopback only with FLOWER_BASIC_AUTH "
                             "(default: %(default)s)")
    flower_cli.add_arguments(flower, _positive_int)

    vendor = sub.add_parser("vendor", help="the demo vendor API")
    vendor_sub = vendor.add_subparsers(dest="vendor_command", required=True, parser_class=Parser,
                                       metavar="COMMAND", title="commands")
    serve = vendor_sub.add_parser("serve", help="serve the demo vendor API", add_help=False)
    serve.add_argument("options", nargs=argparse.REMAINDER,
                       help="the vendor's own options: fanout vendor serve --help lists them "
                            "(default: http://127.0.0.1:8765)")

    replay = sub.add_parser("replay", help="run a run's failed items again, in the same run")
    replay.add_argument("run_id", metavar="RUN", help="a run id")
    replay.add_argument("--stage", default=None, metavar="STAGE",
                        help="only the failed items of this stage (default: every stage's)")
    replay.add_argument("--item", default=None, metavar="ITEM_ID",
                        help="only this failed item, by its id (default: every failed item)")
    _add_wait_options(replay, "print how many items were replayed and return")

    cancel = sub.add_parser("cancel", help="stop a run: nothing more of it runs")
    cancel.add_argument("run_id", metavar="RUN", help="a run id")

    dead = sub.add_parser("dead-letters", help="messages set aside because they could not "
                          "be decoded")
    dead.add_argument("action", nargs="?", choices=["list", "purge"], default="list",
                      help="list them, or purge them all (default: %(default)s)")
    dead.add_argument("--json", action="store_true", help="print the list as JSON")

    limits_cli.add_parser(sub, Parser)

    cache = sub.add_parser("cache", help="the shared input cache")
    cache_actions = cache.add_subparsers(dest="cache_command", required=True, parser_class=Parser,
                                         metavar="COMMAND", title="commands")
    clear = cache_actions.add_parser("clear", help="forget cached results")
    clear.add_argument("target", nargs="?", default=None, metavar="PIPELINE[.STAGE]",
                       help="a pipeline (all its stages) or one stage, PIPELINE.STAGE "
                            "(default: every cached result)")
    schedules.add_parsers(sub, Parser)

    sub.add_parser("down", help="stop the workers on the embedded Redis, then the server")
    return parser


def _add_wait_options(parser: argparse.ArgumentParser, without: str) -> None:
    parser.add_argument("--wait", action="store_true",
                        help=f"wait for the run to finish and show its summary (default: "
                             f"{without})")
    parser.add_argument("--timeout", type=_non_negative_float, default=None,
                        metavar="SECONDS",
                        help="with --wait: stop waiting after this many seconds, exit 1 "
                             "(default: no limit)")
    parser.add_argument("--json", action="store_true",
                        help="with --wait: print the JSON summary as the last line of stdout")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # `fanout vendor serve ...` hands its options to the vendor's own parser untouched.
    if argv[:2] == ["vendor", "serve"]:
        return vendor_main(["serve", *argv[2:]])
    try:
        args = build_parser().parse_args(argv)
        check_environment()
        return _dispatch(args)
    except (CliError, ConfigError) as exc:
        return _fail(str(exc))
    except _LOST_ERRORS as exc:
        # Redis or the broker went away in the middle of a command (a check at its start
        # found them up): one line, exit 1, as when a wait gives up on an outage.
        print(f"fanout: error: lost Redis or the broker: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def check_environment() -> None:
    """Every FANOUT_* setting, once, before a command acts on any (a bad one is a
    ConfigError naming it): the workers' settings and home, the schedules' own, the config
    file's path."""
    validate_environment()
    scheduling.grace_s()
    scheduling.lease_s()
    config_path()


def _fail(message: str) -> int:
    print(f"fanout: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _dispatch(args: argparse.Namespace) -> int:
    command: str = args.command
    if command == "down":
        return _down()
    # Every other command needs the pipelines: a module that fails to import is one line.
    load_configured_pipelines()
    if "schedule_handler" in args:  # beat, schedules (producers/schedules.py)
        return int(args.schedule_handler(args))
    if command == "worker":
        return _worker(args)
    if command == "flower":
        flower_cli.serve(args, _broker_env)
    handler = {"demo": commands.demo, "run": commands.run, "status": commands.status,
               "results": commands.results, "pipelines": catalog.pipelines_command,
               "failures": commands.failures, "replay": commands.replay, "cancel": commands.cancel,
               "dead-letters": commands.dead_letters, "limits": commands.limits,
               "cache": commands.cache}[command]
    return handler(args)


def _down() -> int:
    """Stop the embedded Redis; first ask the workers using it to shut down warmly, so they
    do not fill their logs with reconnect attempts to a server that is gone for good."""
    home = get_settings().home
    url = embedded_redis.running_url(home)
    if url is not None:
        stopped_workers = processes.shutdown_workers(url)
        if stopped_workers:
            print(f"asked {stopped_workers} workers to shut down")
    stopped = embedded_redis.stop(home)
    print("embedded Redis stopped" if stopped else "no embedded Redis running")
    return EXIT_OK


def _broker_env() -> dict[str, str]:
    """Resolve Redis once here so the child process does not have to."""
    url = resolve_redis_url()
    check_reachable(url)
    check_broker(resolve_broker_url())
    return {**os.environ, "FANOUT_REDIS_URL": url}


def _worker(args: argparse.Namespace) -> int:
    env = _broker_env()
    options = {
        "pool": args.pool or processes.DEFAULT_POOL,
        "concurrency": args.concurrency or processes.DEFAULT_CONCURRENCY,
        "queues": args.queues.split(",") if args.queues else (),
        "loglevel": args.loglevel,
        "max_in_flight": args.max_in_flight,
    }
    count = args.processes or processes.default_processes()
    return supervise_workers(count, env, options)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
