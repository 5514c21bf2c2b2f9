"""The whole system on this machine, for ``fanout demo`` and the examples: Redis (embedded
unless FANOUT_REDIS_URL is set), the demo vendor, and worker processes, each a real process
that dies with this one (``processes.spawn``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from producers import processes
from producers.errors import CliError
from workers.connections import check_reachable, resolve_broker_url, resolve_redis_url
from workers.redact import redact
from workers.settings import ConfigError, get_settings
from workers.sinks import check_sink

#: How long the vendor and the workers get to stop after SIGTERM before SIGKILL.
STOP_GRACE_S = 3.0


class StrangerWorkers(CliError):
    """Workers this process did not start consume from its broker: they would take its
    run's items and write them to a sink of their own."""


@dataclass(frozen=True)
class LocalSystem:
    redis_url: str
    vendor_url: str
    sink_url: str


def own_worker_name(n: int) -> str:
    """The node name of this process's n-th worker (``%h``: Celery puts the host in)."""
    return f"local{n}-{os.getpid()}@%h"


def strangers(names: Sequence[str]) -> list[str]:
    """The worker names that are not this process's own workers."""
    own = f"-{os.getpid()}@"
    return [name for name in names if not (name.startswith("local") and own in name)]


@contextmanager
def local_system(
    *,
    vendor_options: Sequence[str] = (),
    pipelines: Sequence[str] = (),
    pythonpath: Sequence[str] = (),
    concurrency: int = processes.DEFAULT_CONCURRENCY,
    max_in_flight: int | None = None,
    worker_processes: int | None = None,
) -> Iterator[LocalSystem]:
    """Start the vendor and workers that also import ``pipelines`` (modules found on
    ``pythonpath``); stop them all at once on exit. The embedded Redis keeps running
    (``fanout down``). Raises ``StrangerWorkers`` when other workers consume from the broker:
    the ping that finds them runs while the vendor starts."""
    settings = get_settings()
    redis_url = resolve_redis_url(settings)
    check_reachable(redis_url)
    check_sink(settings.sink_url)  # one line, exit 2, rather than a run that stands still
    os.environ["FANOUT_REDIS_URL"] = redis_url  # this process and its children agree
    broker_url = resolve_broker_url(settings)
    settings.home.mkdir(parents=True, exist_ok=True)
    env = {"FANOUT_REDIS_URL": redis_url, "FANOUT_SINK_URL": settings.sink_url}
    if pipelines:
        env["FANOUT_PIPELINES"] = ",".join(pipelines)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([*pythonpath, os.environ.get("PYTHONPATH", "")])
    with ExitStack() as stack:
        children: list[subprocess.Popen[Any]] = []
        stack.callback(processes.stop_all, children, STOP_GRACE_S)
        with ThreadPoolExecutor(1) as pool:  # the ping waits its timeout out: meanwhile ...
            answered = pool.submit(processes.worker_names, broker_url)
            vendor = processes.start_vendor(vendor_options)  # ... the vendor starts
            children.append(vendor.process)
            others = strangers(answered.result())
        if others:
            raise StrangerWorkers(
                f"a worker not started by this demo is consuming from {redact(broker_url)} "
                f"({', '.join(others)}); stop it (fanout down) or point FANOUT_REDIS_URL "
                "elsewhere")
        for n in range(1, (worker_processes or processes.default_processes()) + 1):
            children.append(processes.start_worker(
                env,
                concurrency=concurrency,
                max_in_flight=max_in_flight,
                name=own_worker_name(n),
                log_path=str(settings.home / "worker.log"),
                # Should this process die, so does its vendor: a warm shutdown would only
                # run the claimed items into a gone vendor's retries (it took 46 s).
                death_signal=signal.SIGKILL,
            ))
        yield LocalSystem(redis_url, vendor.url, settings.sink_url)


def run_example(main: Callable[[list[str]], int]) -> int:
    """Run an example's ``main`` on this process's arguments. What the fanout CLI says in one
    line and exit code 2 (a bad setting, a stranger worker on the broker) an example says the
    same way, not as a traceback."""
    try:
        return main(sys.argv[1:])
    except (CliError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
