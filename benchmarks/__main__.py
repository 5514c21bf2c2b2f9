"""``python -m benchmarks [--quick] [--only NAME[,NAME]] [--out PATH] [--repeat N]``.

Starts a private Redis and the demo vendor, runs the suites one after another (each on a fresh
Redis), prints the tables and writes every figure and setting to a JSON file. Exit code 0 when
every suite that ran succeeded, 1 when one failed, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

SUITES = ("harvest", "pools", "enqueue", "memory", "loop", "ratelimit", "flower",
          "vendor", "fairshare")
LOAD_WARNING = 0.5  # load average per core above which other work is likely to skew figures


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small shapes: a smoke run")
    parser.add_argument("--only", default="", help=f"comma-separated suites ({', '.join(SUITES)})")
    parser.add_argument("--out", type=Path, help="JSON results file "
                        "(default benchmarks/results/<UTC timestamp>.json)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="timed runs per measurement, interleaved across contenders; "
                             "median [min-max] reported (default: 3 for harvest, 1 for the "
                             "others)")
    parser.add_argument("--latency-ms", type=float, default=None,
                        help="the demo vendor's latency per request, which the sleep leaf "
                             "sleeps too (default 20); 0 makes CPU the only bound")
    parser.add_argument("--no-sweep", dest="sweep", action="store_false",
                        help="harvest: run each contender on its first candidate settings "
                             "instead of sweeping them first (benchmarks/regimes.py)")
    parser.add_argument("--keep-tmp", action="store_true", help="keep worker logs and sinks")
    args = parser.parse_args(argv)
    args.suites = [s.strip() for s in args.only.split(",") if s.strip()] or list(SUITES)
    unknown = [s for s in args.suites if s not in SUITES]
    if unknown:
        parser.error(f"unknown suite(s) {', '.join(unknown)} (known: {', '.join(SUITES)})")
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be >= 1")
    if args.latency_ms is not None and not 0 <= args.latency_ms <= 1000:
        parser.error("--latency-ms must be between 0 and 1000")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(stderr=True)
    # Piped to a file, rich would wrap at 80 columns: the tables need more.
    out_console = Console() if sys.stdout.isatty() else Console(width=200)
    started = dt.datetime.now(dt.UTC)
    t0 = time.perf_counter()

    # Before benchmarks.leaf is imported: the driver and every worker it starts read it.
    if args.latency_ms is not None:
        os.environ["BENCH_LATENCY_MS"] = str(args.latency_ms)  # benchmarks.leaf.LATENCY_ENV
    # The environment first: it sets FANOUT_REDIS_URL before anything imports `workers`.
    from benchmarks.env import BenchEnv
    from benchmarks.harvest import LATENCY_MS

    env = BenchEnv(LATENCY_MS, keep_tmp=args.keep_tmp).start()
    try:
        from benchmarks import report
        from benchmarks.core import Context, SuiteResult, run_suite
        from benchmarks.enqueue import enqueue
        from benchmarks.fairshare import fairshare
        from benchmarks.flower_memory import flower_memory
        from benchmarks.harvest import harvest, pools
        from benchmarks.loop import loop
        from benchmarks.memory import memory
        from benchmarks.ratelimit import ratelimit
        from benchmarks.vendor import vendor

        registry = {"harvest": harvest, "pools": pools, "enqueue": enqueue, "memory": memory,
                    "loop": loop, "ratelimit": ratelimit, "flower": flower_memory,
                    "vendor": vendor, "fairshare": fairshare}
        machine = report.machine()
        code_at_start = report.code_state()
        cores = os.cpu_count() or 1
        if machine["loadavg_at_start"][0] > LOAD_WARNING * cores:
            console.log(f"[yellow]load average {machine['loadavg_at_start'][0]:.2f} on {cores} "
                        "cores before starting: other work may skew the figures[/yellow]")
        console.log(f"redis {env.redis_url}, vendor {env.vendor_handle.url}, tmp {env.tmp}")
        ctx = Context(env=env, quick=args.quick, console=console, repeats=args.repeat,
                      sweep=args.sweep)
        results: list[SuiteResult] = []
        for name in args.suites:
            result = run_suite(name, registry[name], ctx)
            ctx.results[name] = result
            results.append(result)
        total_s = time.perf_counter() - t0
        versions = report.versions(env.server_version())
        code_at_end = report.code_state()
        if code_at_start != code_at_end:
            console.log("[yellow]the code changed during the run (see code in the JSON): "
                        "contenders may have run different code[/yellow]")
        document = {
            "started_at": started.isoformat(),
            "finished_at": dt.datetime.now(dt.UTC).isoformat(),
            "wall_s": round(total_s, 1),
            "machine": {**machine, "loadavg_at_end": os.getloadavg()},
            "versions": versions,
            "code": {"at_start": code_at_start, "at_end": code_at_end,
                     "changed_during_run": code_at_start != code_at_end},
            "settings": {
                "quick": args.quick, "suites": args.suites, "sweep": args.sweep,
                "repeat": args.repeat,  # None: each suite's default (in its settings)
                "latency_ms": LATENCY_MS, "redis": "private valkey, appendonly no",
                "vendor": "python -m demo_vendor serve " + " ".join(env.vendor_handle.options),
            },
            "suites": {r.name: report.suite_json(r) for r in results},
        }
        out = args.out or report.default_path(started)
        report.write_json(out, document)
        v = versions
        header = (f"fanout benchmarks{' (quick)' if args.quick else ''}: {cores} cores, "
                  f"Python {v['python']}, celery {v['celery']}, kombu {v['kombu']}, "
                  f"{v['redis_server']}")
        report.render(out_console, results, header)
        out_console.print(f"results: {out}  ({total_s:.0f} s)")
        return 1 if any(r.status == "error" for r in results) else 0
    finally:
        env.close()


if __name__ == "__main__":
    sys.exit(main())
