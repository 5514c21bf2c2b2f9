"""``fanout flower``: Flower on the fanout broker, behind one login and with bounded memory.

Who may read it:
- with ``FLOWER_BASIC_AUTH=user:password[,user2:password2]`` (required to listen beyond
  loopback), Flower's pages and its ``/api`` ask for those credentials (Flower's own rule),
  and so does ``/metrics``, which Flower serves to anyone: here Flower's own metrics handler
  behind its own login check (``MetricsBehindLogin``) takes its place in Flower's route table.
  ``--open-metrics`` leaves ``/metrics`` open for a Prometheus scraper without credentials,
  on a loopback address only.
- without it, Flower listens on loopback only; its pages and ``/metrics`` are open to whatever
  runs on this host, and its ``/api`` answers 401 (Flower opens it with
  ``FLOWER_UNAUTHENTICATED_API=1``, which also lets any web page a browser on this host loads
  call it: Flower then answers cross-origin requests).
``/healthcheck`` answers "OK" to anyone, whatever the login.

Memory: Flower keeps every task it has heard of in memory, up to ``--max_tasks`` (Flower's own
default is 100,000), and every worker it has seen. fanout keeps the latest
``DEFAULT_MAX_TASKS`` and drops a worker offline for ``DEFAULT_PURGE_OFFLINE_S`` (``fanout
worker`` names its processes after its pid: each restart brings new names). Flower's RSS after
200,000 items with either bound: ``python -m benchmarks --only flower`` (benchmarks/README.md).

The command line runs in two processes: ``fanout flower`` checks its options and resolves
the broker, then replaces itself (exec) with ``python -m producers.flower``, the Flower
process, so signals reach Flower and no parent is left behind.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from producers.errors import UsageError

DEFAULT_MAX_TASKS = 10_000
DEFAULT_PURGE_OFFLINE_S = 3600
AUTH_ENV = "FLOWER_BASIC_AUTH"
_OPEN_METRICS = "--open-metrics"  # the Flower process's own first argument


def add_arguments(parser: argparse.ArgumentParser, positive_int: Callable[[str], int]) -> None:
    """The options beside ``--port`` and ``--address`` (``positive_int``: the CLI's type)."""
    parser.add_argument("--max-tasks", type=positive_int, default=DEFAULT_MAX_TASKS,
                        help="tasks Flower keeps in memory, the latest ones (Flower's own "
                             "default, 100000, takes it past 700 MB; default: %(default)s)")
    parser.add_argument("--purge-offline-workers", type=positive_int,
                        default=DEFAULT_PURGE_OFFLINE_S, metavar="SECONDS",
                        help="drop a worker offline this long from the dashboard and /metrics "
                             f"(default: {DEFAULT_PURGE_OFFLINE_S})")
    parser.add_argument(_OPEN_METRICS, action="store_true",
                        help=f"serve /metrics without {AUTH_ENV}'s credentials, for a "
                             "Prometheus scraper on this host (loopback --address only; "
                             "default: /metrics asks for them like the pages)")


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def flower_command(args: argparse.Namespace) -> list[str]:
    """The Flower process's command line for ``fanout flower``'s options."""
    return [sys.executable, "-m", "producers.flower",
            *([_OPEN_METRICS] if args.open_metrics else []),
            f"--port={args.port}", f"--address={args.address}",
            f"--max_tasks={args.max_tasks}",
            f"--purge_offline_workers={args.purge_offline_workers}"]


def serve(args: argparse.Namespace, broker_env: Callable[[], dict[str, str]]) -> NoReturn:
    """Check the options, then become the Flower process (``broker_env``: the environment
    with the broker resolved)."""
    if not is_loopback(args.address):
        if not os.environ.get(AUTH_ENV):
            raise UsageError(f"refusing to serve Flower on {args.address!r} without "
                             f"{AUTH_ENV}=user:password (its task view shows every run's "
                             "arguments)")
        if args.open_metrics:
            raise UsageError(f"{_OPEN_METRICS} serves /metrics to anyone who reaches it: "
                             f"only with a loopback --address, not {args.address!r}")
    cmd = flower_command(args)
    os.execvpe(cmd[0], cmd, broker_env())  # Flower replaces this process: signals reach it


def _metrics_behind_login() -> None:
    """Put Flower's ``/metrics`` behind the login its pages have. Flower builds its
    application from the route table ``flower.urls.handlers``: its metrics route gets the
    same handler with Tornado's ``authenticated`` check (Basic auth answers 401 without the
    credentials; without any login configured it lets everyone through, like the pages)."""
    from flower import urls
    from flower.views.monitor import Metrics
    from tornado import web

    class MetricsBehindLogin(Metrics):
        @web.authenticated
        async def get(self) -> None:
            await super().get()

    routes = [i for i, route in enumerate(urls.handlers)
              if isinstance(route, tuple) and route[1] is Metrics]
    if len(routes) != 1:  # another Flower: fail closed rather than serve /metrics open
        sys.exit(f"fanout flower: Flower {_flower_version()} has no /metrics route where "
                 f"fanout expects one: run with {_OPEN_METRICS}, or a Flower 2.x")
    path = urls.handlers[routes[0]][0]
    urls.handlers[routes[0]] = (path, MetricsBehindLogin)


def _flower_version() -> str:
    from importlib.metadata import version

    return version("flower")


def main(argv: Sequence[str]) -> None:
    """The Flower process: Celery's ``celery -A workers flower`` with the options given."""
    options = list(argv)
    if options[:1] == [_OPEN_METRICS]:
        options = options[1:]
    else:
        _metrics_behind_login()
    from celery.bin.celery import celery

    celery.main(["-A", "workers", "flower", *options], prog_name="fanout flower")


if __name__ == "__main__":
    main(sys.argv[1:])
