"""The whole system on this machine, for ``fanout demo`` and the examples: Redis (embedded
unless FANOUT_REDIS_URL is set), the demo vendor, and one worker, each a real process."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

from producers import processes
from workers.connections import check_reachable, resolve_redis_url
from workers.settings import get_settings
from workers.sinks import check_sink


@dataclass(frozen=True)
class LocalSystem:
    redis_url: str
    vendor_url: str
    sink_url: str


@contextmanager
def local_system(
    *,
    vendor_options: Sequence[str] = (),
    pipelines: Sequence[str] = (),
    pythonpath: Sequence[str] = (),
    concurrency: int = processes.DEFAULT_CONCURRENCY,
    worker_processes: int | None = None,
) -> Iterator[LocalSystem]:
    """Start the vendor and a worker that also imports ``pipelines`` (modules found on
    ``pythonpath``); stop both on exit. The embedded Redis keeps running (``fanout down``)."""
    settings = get_settings()
    redis_url = resolve_redis_url(settings)
    check_reachable(redis_url)
    check_sink(settings.sink_url)  # one line, exit 2, rather than a run that stands still
    os.environ["FANOUT_REDIS_URL"] = redis_url  # this process and its children agree
    settings.home.mkdir(parents=True, exist_ok=True)
    env = {"FANOUT_REDIS_URL": redis_url, "FANOUT_SINK_URL": settings.sink_url}
    if pipelines:
        env["FANOUT_PIPELINES"] = ",".join(pipelines)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([*pythonpath, os.environ.get("PYTHONPATH", "")])
    with ExitStack() as stack:
        vendor = processes.start_vendor(vendor_options)
        stack.callback(vendor.stop)
        for n in range(1, (worker_processes or processes.default_processes()) + 1):
            worker = processes.start_worker(
                env,
                concurrency=concurrency,
                name=f"local{n}-{os.getpid()}@%h",
                log_path=str(settings.home / "worker.log"),
            )
            stack.callback(processes.stop_process, worker)
        yield LocalSystem(redis_url, vendor.url, settings.sink_url)
