"""Harvest throughput: metric-days (leaves) per second for accounts x services x days.

Contenders, each on the same Redis, vendor and machine (``benchmarks/contenders.py``):
- fanout as a user runs it (``celery -A workers worker`` processes, ``start_run``, ledger wait);
- the hand-written Celery fan-out (``benchmarks.celery_baseline``), with and without task events;
- the same shape on Dramatiq (``benchmarks.dramatiq_baseline``);
- in the threads regime, each baseline with three leaf kinds (``benchmarks/leaf.py``): fanout's
  own leaf code (its ``request_json`` and ``SqliteSink``: the equal-terms comparison), a shared
  ``httpx.Client`` + plain INSERT (the client's and sink's share), and a sleep-only leaf
  (framework cost alone), which fanout runs too (``benchmarks/sleep_pipeline.py``), and a naive
  sequential loop (one thread, fanout's leaf code), sampled and extrapolated;
- in the in-flight regime (``--latency-ms 200``), the contenders at one in-flight bound:
  Celery's gevent pool, Dramatiq's gevent launcher and async actors (``benchmarks/regimes.py``).

Each contender runs at its best: a short sweep of the worker settings its docs offer picks
them (``regimes.py`` lists the candidates), before the timed rounds.

Repeats are interleaved and rotated: round 1 runs every contender once, A B C ..., round 2
starts further down the list, and so on, so slow drifts of the machine's load hit every
contender alike and none always runs after the same one. Every timed run starts its own
workers on a flushed Redis, waits until they answer (Celery ping / Dramatiq's ready lines), runs
a tiny warm-up harvest, times the real one from trigger to the last leaf, and stops them.
A contender whose rows, ledger or vendor request count do not match the shape in any of its runs
reports no number.
"""

from __future__ import annotations

import dataclasses
import secrets
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from benchmarks import baseline_common as common
from benchmarks import leaf, regimes
from benchmarks.contenders import (
    END_DAY,
    READY_TIMEOUT_S,
    CeleryBaselineHarness,
    DramatiqHarness,
    FanoutHarness,
    Harness,
    RunOutcome,
    Shape,
    WorkerConfig,
    _verify,
)
from benchmarks.core import (
    BenchmarkError,
    Context,
    SuiteResult,
    Table,
    fmt_rate,
)
from benchmarks.env import BenchEnv, cpu_seconds, machine_cpu_seconds, rss_bytes

LATENCY_MS = leaf.LATENCY_MS
WARMUP_SHAPE_ARGS = (2, 10, 2)
NAIVE_SAMPLE = 300
NAIVE_SAMPLE_QUICK = 50
HARVEST_REPEATS = 3  # the harvest suite's default --repeat

WARMUP = Shape(*WARMUP_SHAPE_ARGS)
FULL_SHAPE = Shape(10, 50, 30)
QUICK_SHAPE = Shape(4, 25, 10)
POOLS_SHAPE = Shape(4, 50, 15)
POOLS_SHAPE_QUICK = Shape(4, 25, 2)
#: The sweep's harvest: smaller than the timed one; in the in-flight regime big enough that
#: the leaves, not the fan-out's first listing calls at 200 ms each, take most of a run.
SWEEP_SHAPE = {regimes.THREADS: Shape(4, 50, 15), regimes.IN_FLIGHT_REGIME: Shape(10, 50, 10)}
SWEEP_SHAPE_QUICK = Shape(2, 10, 5)
#: The vendor's own capacity check in the in-flight regime: at most this many requests per
#: connection, and this long (``benchmarks/vendorload.py``).
VENDOR_CHECK_REQUESTS_PER_CONNECTION = 25
VENDOR_CHECK_SECONDS = 8.0

MAIN_CONFIG = regimes.FANOUT_THREADS
POOL_CONFIGS = (
    WorkerConfig(1, "threads", 32),
    WorkerConfig(2, "threads", 16),  # async stages: fewer threads carry bigger batches
    WorkerConfig(2, "threads", 32),
    WorkerConfig(2, "threads", 64),
    WorkerConfig(1, "prefork", 16),
)

# The figures every run has, each summarised as median [min-max] over the runs.
SPREAD_FIGURES = ("rate", "wall_s", "worker_cpu_ms_per_item", "redis_cpu_ms_per_item",
                  "vendor_cpu_ms_per_item", "worker_rss_bytes", "leaf_phase_rate")
#: The leaf phase of a run: from this share of the leaves done to that one. Its rate leaves
#: out the start (the fan-out still making the first leaves) and the tail.
LEAF_PHASE = (0.2, 0.8)


def thread_ceiling(config: WorkerConfig, latency_ms: float = LATENCY_MS) -> float | None:
    """Leaves per second that ``config``'s workers could run at most, each of their calls in
    flight waiting the vendor's latency, whatever the framework around them; None at 0 ms,
    where only CPU bounds the rate."""
    if latency_ms <= 0:
        return None
    return config.in_flight * 1000 / latency_ms


def rotated(items: Sequence[Any], round_no: int, repeats: int) -> list[Any]:
    """The order of round ``round_no`` (from 1) of ``repeats``: ``items`` rotated so each
    round starts a further len/repeats places down the list, and every second round run
    backwards, so a contender neither holds one place in the round nor always follows the
    same one."""
    if not items:
        return []
    shift = (round_no - 1) * max(1, len(items) // max(1, repeats)) % len(items)
    order = [*items[shift:], *items[:shift]]
    return order[::-1] if round_no % 2 == 0 else order


def leaf_phase_rate(samples: Sequence[tuple[float, int]], total: int) -> float | None:
    """Leaves per second between LEAF_PHASE[0] and LEAF_PHASE[1] of ``total`` done, the
    instant of each mark interpolated between the two samples around it (the count is 0 at
    the trigger); None when a mark was never reached."""
    marks = [share * total for share in LEAF_PHASE]
    times = [_crossing(samples, mark) for mark in marks]
    if times[0] is None or times[1] is None or times[1] <= times[0]:
        return None
    return round((marks[1] - marks[0]) / (times[1] - times[0]), 1)


def _crossing(samples: Sequence[tuple[float, int]], mark: float) -> float | None:
    before = (0.0, 0)
    for at, count in samples:
        if count >= mark:
            if count == before[1]:
                return at
            return before[0] + (mark - before[1]) / (count - before[1]) * (at - before[0])
        before = (at, count)
    return None


@dataclass
class Measurement:
    contender: str
    leaf: str  # a key of leaf.KINDS
    shape: Shape
    config: WorkerConfig | None
    items: int
    wall_s: float  # median over the runs
    rate: float  # metric-days per second, median over the runs
    runs: list[dict[str, Any]] = field(default_factory=list)  # every run, in the order run
    stats: dict[str, dict[str, float]] = field(default_factory=dict)  # median, min, max
    worker_rss_bytes: int | None = None  # median
    cores_used: dict[str, float] = field(default_factory=dict)  # of the median-rate run
    worker_cpu_ms_per_item: float | None = None  # median
    redis_cpu_ms_per_item: float | None = None  # median
    vendor_cpu_ms_per_item: float | None = None  # median
    checks: dict[str, Any] = field(default_factory=dict)  # of the median-rate run
    note: str = ""

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["shape"] = {**asdict(self.shape), "total": self.shape.total}
        if self.config is not None:
            data["config"]["label"] = self.config.label
        return data




@dataclass(frozen=True)
class Contender:
    """One row of the table: a harness factory (a fresh harness per run; None: the naive
    loop), its leaf kind, the worker settings, and the contender its ratio compares with."""

    name: str
    leaf: str
    make: Callable[[], Harness] | None
    config: WorkerConfig | None
    reference: str = "fanout"


def harvest_contenders(regime: str, chosen: dict[str, WorkerConfig]) -> list[Contender]:
    """The harvest suite's contenders in ``regime``, each family on its ``chosen`` settings,
    in the order of the first round."""
    fanout, celery, dramatiq = chosen["fanout"], chosen["celery"], chosen["dramatiq"]
    celery_quiet = dataclasses.replace(celery, events=False)
    if regime == regimes.IN_FLIGHT_REGIME:
        rows = [Contender("fanout", "fanout", lambda: FanoutHarness(), fanout)]
        if "fanout-inflight" in chosen:
            rows.append(Contender("fanout-inflight", "fanout",
                                  lambda: regimes.fanout_in_flight_harness("fanout"),
                                  chosen["fanout-inflight"]))
        return [
            *rows,
            Contender("celery", "fanout", lambda: CeleryBaselineHarness("fanout"), celery),
            Contender("celery-no-events", "fanout", lambda: CeleryBaselineHarness("fanout"),
                      celery_quiet),
            Contender("dramatiq", "fanout", lambda: DramatiqHarness("fanout"), dramatiq),
            Contender("dramatiq-async", "fanout", lambda: DramatiqHarness("fanout"),
                      chosen["dramatiq-async"]),
        ]
    return [
        Contender("fanout", "fanout", lambda: FanoutHarness(), fanout),
        Contender("celery", "fanout", lambda: CeleryBaselineHarness("fanout"), celery),
        Contender("celery-no-events", "fanout", lambda: CeleryBaselineHarness("fanout"),
                  celery_quiet),
        Contender("dramatiq", "fanout", lambda: DramatiqHarness("fanout"), dramatiq),
        Contender("celery-client", "client", lambda: CeleryBaselineHarness("client"), celery),
        Contender("dramatiq-client", "client", lambda: DramatiqHarness("client"), dramatiq),
        Contender("fanout-sleep", "sleep", lambda: FanoutHarness(sleep=True), fanout,
                  "fanout-sleep"),
        Contender("celery-sleep", "sleep", lambda: CeleryBaselineHarness("sleep"), celery,
                  "fanout-sleep"),
        Contender("dramatiq-sleep", "sleep", lambda: DramatiqHarness("sleep"), dramatiq,
                  "fanout-sleep"),
        Contender("naive", "fanout", None, None),
    ]


# -- measuring ----------------------------------------------------------------------------------


def measure_once(
    ctx: Context, harness: Harness, shape: Shape, config: WorkerConfig, *, label: str = ""
) -> dict[str, Any]:
    """One timed run on fresh workers: flush Redis, start the workers, wait until they answer,
    warm up, time a harvest of ``shape``, stop the workers. Returns the run's figures."""
    env = ctx.env
    vendor = env.vendor_handle
    suite_dir = env.suite_dir(f"{label or harness.name}-{secrets.token_hex(3)}")
    env.flush()
    procs = harness.start(env, config, suite_dir)
    try:
        harness.wait_ready(procs, suite_dir, READY_TIMEOUT_S)
        vendor.configure(accounts=WARMUP.accounts, services=WARMUP.services)
        harness.run(env, WARMUP, suite_dir)
        vendor.configure(accounts=shape.accounts, services=shape.services)
        pids = [p.pid for p in procs]
        vendor.reset()
        cpu_before = _cpu(env, pids)
        outcome = harness.run(env, shape, suite_dir)
        cpu_after = _cpu(env, pids)
        rss = rss_bytes(pids)
    finally:
        env.stop_processes(procs)
    requests = vendor.metric_requests()
    outcome.checks["vendor_metric_requests"] = requests
    if harness.leaf == "sleep":
        if requests:
            raise BenchmarkError(f"the vendor served {requests} metric requests to a "
                                 "sleep-only leaf")
    elif requests < shape.total:
        raise BenchmarkError(f"the vendor served {requests} metric requests, "
                             f"fewer than the {shape.total} metric-days")
    return _run_figures(shape.total, outcome, cpu_before, cpu_after, rss)


def _run_figures(
    items: int, outcome: RunOutcome, before: dict[str, float], after: dict[str, float],
    rss: int | None,
) -> dict[str, Any]:
    def ms_per_item(key: str) -> float:
        return round((after[key] - before[key]) * 1000 / items, 3)

    return {
        "wall_s": round(outcome.wall_s, 3),
        "rate": round(items / outcome.wall_s, 1),
        "leaf_phase_rate": leaf_phase_rate(outcome.samples, items),
        "samples": outcome.samples,
        "worker_cpu_ms_per_item": ms_per_item("workers"),
        "redis_cpu_ms_per_item": ms_per_item("redis"),
        "vendor_cpu_ms_per_item": ms_per_item("vendor"),
        "worker_rss_bytes": rss,
        "cores_used": _per_wall(before, after, outcome.wall_s),
        "checks": outcome.checks,
    }


def run_interleaved(
    ctx: Context, contenders: Sequence[Contender], shape: Shape, repeats: int, *,
    label: str = "", naive_sample: int = NAIVE_SAMPLE,
) -> tuple[dict[str, Measurement], dict[str, str], list[tuple[int, str]]]:
    """``repeats`` rounds, each running every contender once, in an order that changes each
    round (``rotated``). Returns the measurements of the contenders whose every run did the
    work, the errors of the others (a failed contender is not run again), and the order the
    runs went in."""
    runs: dict[str, list[dict[str, Any]]] = {c.name: [] for c in contenders}
    errors: dict[str, str] = {}
    order: list[tuple[int, str]] = []
    for round_no in range(1, repeats + 1):
        ctx.log(f"  round {round_no}/{repeats}: shape {shape.label} = {shape.total:,} "
                "metric-days")
        for contender in rotated(contenders, round_no, repeats):
            if contender.name in errors:
                continue
            try:
                if contender.make is None:
                    run = measure_naive_once(ctx, shape, naive_sample)
                else:
                    assert contender.config is not None
                    run = measure_once(ctx, contender.make(), shape, contender.config,
                                       label=label or contender.name)
            except Exception as exc:
                errors[contender.name] = f"{type(exc).__name__}: {exc}"
                ctx.log(f"    [red]{contender.name} failed[/red]: {exc}")
                continue
            run["round"] = round_no
            runs[contender.name].append(run)
            order.append((round_no, contender.name))
            ctx.log(f"    {contender.name:<16} {run['rate']:>7,.0f} metric-days/s "
                    f"({run['wall_s']:.2f} s); CPU ms/metric-day: workers "
                    f"{_num(run['worker_cpu_ms_per_item'])}, redis "
                    f"{_num(run['redis_cpu_ms_per_item'])}, vendor "
                    f"{_num(run['vendor_cpu_ms_per_item'])}; other+steal "
                    f"{_noise(run['cores_used']):.2f} cores")
    measurements = {
        c.name: _aggregate(c, shape, runs[c.name])
        for c in contenders if c.name not in errors and runs[c.name]
    }
    return measurements, errors, order


def measure(
    ctx: Context, harness: Harness, shape: Shape, config: WorkerConfig, *, repeats: int = 1,
    label: str = "",
) -> Measurement:
    """``repeats`` timed runs of one harness (each on fresh workers); raises when one failed."""
    contender = Contender(harness.name, harness.leaf, lambda: harness, config)
    measurements, errors, _ = run_interleaved(ctx, [contender], shape, repeats, label=label)
    if errors:
        raise BenchmarkError(errors[harness.name])
    return measurements[harness.name]


def _spread(values: Sequence[float | None]) -> dict[str, float] | None:
    present = [v for v in values if v is not None]
    if not present:
        return None
    return {"median": round(statistics.median(present), 3), "min": min(present),
            "max": max(present), "runs": len(present)}


def _aggregate(contender: Contender, shape: Shape, runs: list[dict[str, Any]]) -> Measurement:
    stats = {k: s for k in SPREAD_FIGURES if (s := _spread([r.get(k) for r in runs]))}
    middle = _median_run(runs)

    def median(key: str) -> float | None:
        return stats[key]["median"] if key in stats else None

    rss = median("worker_rss_bytes")
    return Measurement(
        contender=contender.name, leaf=contender.leaf, shape=shape, config=contender.config,
        items=shape.total, wall_s=float(stats["wall_s"]["median"]),
        rate=float(stats["rate"]["median"]), runs=runs, stats=stats,
        worker_rss_bytes=int(rss) if rss is not None else None,
        cores_used=middle["cores_used"], checks=middle["checks"],
        worker_cpu_ms_per_item=median("worker_cpu_ms_per_item"),
        redis_cpu_ms_per_item=median("redis_cpu_ms_per_item"),
        vendor_cpu_ms_per_item=median("vendor_cpu_ms_per_item"),
        note=middle.get("note", ""),
    )


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(runs, key=lambda r: float(r["rate"]))
    return ordered[(len(ordered) - 1) // 2]


def _cpu(env: BenchEnv, worker_pids: list[int]) -> dict[str, float]:
    """CPU seconds so far: ours by process group, and what the rest of the machine used
    (``other``: busy time not ours; ``steal``: taken by the hypervisor) — the noise gauge."""
    ours = {
        "workers": cpu_seconds(worker_pids),
        "vendor": cpu_seconds([env.vendor_handle.pid]),
        "redis": cpu_seconds([env.redis_pid]),
        "driver": time.process_time(),
    }
    machine = machine_cpu_seconds()
    return {**ours, "other": machine["busy"] - sum(ours.values()), "steal": machine["steal"]}


def _per_wall(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict[str, float]:
    """Cores used: CPU seconds / wall seconds. ``other`` is a difference of counters read at
    slightly different instants, so it can dip a hair below zero: clamp it."""
    return {k: round(max(0.0, (after[k] - before[k]) / wall_s), 2) for k in before}


def measure_naive_once(ctx: Context, shape: Shape, sample: int) -> dict[str, Any]:
    """One thread in this process doing fanout's leaf code (``leaf.fetch_record`` on
    ``request_json``'s per-thread transport, ``SqliteSink.write`` of one row) per metric-day;
    ``sample`` of them, timed and extrapolated to the shape, listing requests included. Its
    worker CPU is this process's CPU during the sample (it is the worker)."""
    from workers.sinks.sqlite import SqliteSink

    env = ctx.env
    vendor = env.vendor_handle
    vendor.configure(accounts=shape.accounts, services=shape.services)
    suite_dir = env.suite_dir(f"naive-{secrets.token_hex(3)}")
    sink_path = suite_dir / "naive.db"
    sink = SqliteSink(sink_path)  # this one-thread "process"'s sink
    tag = f"naive-{secrets.token_hex(4)}"
    url = vendor.url
    accounts = [a["id"] for a in leaf.get_json(f"{url}/accounts")["accounts"]]
    items: list[dict[str, str]] = []
    for account_id in accounts:
        for svc in leaf.list_services(url, account_id):
            items += [{**svc, "day": d} for d in common.metric_days(END_DAY, shape.days)]
        if len(items) >= sample:
            break
    items = items[:sample]
    vendor.reset()
    before = {"workers": time.process_time(), "vendor": cpu_seconds([vendor.pid]),
              "redis": cpu_seconds([env.redis_pid])}
    machine_before = machine_cpu_seconds()
    started = time.perf_counter()
    for item in items:
        sink.write([leaf.fetch_record(url, item)], tag)
    elapsed = time.perf_counter() - started
    after = {"workers": time.process_time(), "vendor": cpu_seconds([vendor.pid]),
             "redis": cpu_seconds([env.redis_pid])}
    machine_after = machine_cpu_seconds()
    sink.close()
    checks: dict[str, Any] = {"sample": len(items), "leaf": "fanout"}
    _verify(checks, {
        "sink_rows": (common.sink_count(sink_path, tag), len(items)),
        "vendor_metric_requests": (vendor.metric_requests(), len(items)),
    })
    page_size = int(vendor.configure()["page_size"])
    listing_requests = 1 + shape.accounts * -(-shape.services // page_size)
    projected_wall = (shape.total + listing_requests) * elapsed / len(items)
    ours = sum(after[k] - before[k] for k in after)
    cores = {k: round(max(0.0, (after[k] - before[k]) / elapsed), 2) for k in after}
    cores["other"] = round(max(0.0, (machine_after["busy"] - machine_before["busy"] - ours)
                               / elapsed), 2)
    cores["steal"] = round((machine_after["steal"] - machine_before["steal"]) / elapsed, 2)

    def ms_per_item(key: str) -> float:
        return round((after[key] - before[key]) * 1000 / len(items), 3)

    return {
        "wall_s": round(projected_wall, 2),
        "rate": round(shape.total / projected_wall, 1),
        "sample": len(items), "sample_wall_s": round(elapsed, 3),
        "sample_rate": round(len(items) / elapsed, 1),
        "worker_cpu_ms_per_item": ms_per_item("workers"),
        "redis_cpu_ms_per_item": None,
        "vendor_cpu_ms_per_item": ms_per_item("vendor"),
        "worker_rss_bytes": None,
        "cores_used": cores,
        "checks": checks,
        "note": f"1 thread; {len(items)} sampled, extrapolated "
                f"(incl. {listing_requests} listing requests)",
    }


# -- suites -------------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _noise(cores: dict[str, float]) -> float:
    return cores.get("other", 0.0) + cores.get("steal", 0.0)


def fmt_spread(stats: dict[str, dict[str, float]], key: str, fmt: Callable[[float], str]) -> str:
    """``median [min-max]`` (a lone run: the value alone); ``-`` when there is none."""
    s = stats.get(key)
    if s is None:
        return "-"
    if s["runs"] < 2:
        return fmt(s["median"])
    return f"{fmt(s['median'])} [{fmt(s['min'])}-{fmt(s['max'])}]"


def _ms(value: float) -> str:
    return f"{value:.2f}"


def _mib(value: float) -> str:
    return f"{value / 2**20:,.0f}"


def _ratios(
    contenders: Sequence[Contender], measurements: dict[str, Measurement]
) -> tuple[dict[str, float | None], dict[str, list[float]]]:
    """The reference's median rate / each contender's (``fanout/celery``...), and the same per
    round from the runs of that round (interleaving pairs them in time)."""
    ratios: dict[str, float | None] = {}
    per_round: dict[str, list[float]] = {}
    for c in contenders:
        if c.name == c.reference:
            continue
        key = f"{c.reference}/{c.name}"
        ref, other = measurements.get(c.reference), measurements.get(c.name)
        ratios[key] = round(ref.rate / other.rate, 2) if ref and other and other.rate else None
        if ref and other:
            by_round = {r["round"]: r["rate"] for r in ref.runs}
            per_round[key] = [round(by_round[r["round"]] / r["rate"], 2)
                              for r in other.runs if r["round"] in by_round and r["rate"]]
    return ratios, per_round


def _sweep_family(
    ctx: Context, family: regimes.Family, shape: Shape
) -> tuple[WorkerConfig, dict[str, Any]]:
    """Run ``family``'s worker shapes once each, then the variations of the fastest; return
    the fastest of all and every run (a candidate that failed gets its error)."""
    tried: dict[WorkerConfig, dict[str, Any]] = {}

    def run_all(configs: Sequence[WorkerConfig], stage: str) -> None:
        contenders = [Contender(c.label, "fanout", lambda: family.make("fanout"), c)
                      for c in configs if c not in tried]
        if not contenders:
            return
        ctx.log(f"  sweep {family.name}: {stage}")
        found, errors, _ = run_interleaved(ctx, contenders, shape, 1,
                                           label=f"sweep-{family.name}")
        for c in contenders:
            m = found.get(c.name)
            tried[c.config] = (  # type: ignore[index]
                {"error": errors.get(c.name, "no run")} if m is None else {
                    "rate": m.rate, "wall_s": m.wall_s,
                    "leaf_phase_rate": m.stats.get("leaf_phase_rate", {}).get("median"),
                    "worker_cpu_ms_per_item": m.worker_cpu_ms_per_item,
                    "worker_rss_bytes": m.worker_rss_bytes, "cores_used": m.cores_used})

    def best() -> WorkerConfig | None:
        measured = [(r["rate"], c) for c, r in tried.items() if "rate" in r]
        return max(measured, key=lambda rc: rc[0])[1] if measured else None

    run_all(family.shapes, "worker shapes")
    shape_winner = best()
    if shape_winner is not None:
        run_all(family.varied(shape_winner), f"variations of {shape_winner.label}")
    chosen = best()
    if chosen is None:
        raise BenchmarkError(f"every {family.name} candidate failed: "
                             + "; ".join(r.get("error", "") for r in tried.values()))
    return chosen, {
        "why": family.why, "shape": {**asdict(shape), "total": shape.total},
        "chosen": chosen.label, "chosen_config": asdict(chosen),
        "candidates": [{"config": c.label, **asdict(c), **r} for c, r in tried.items()],
    }


def choose_configs(
    ctx: Context, families: Sequence[regimes.Family], shape: Shape
) -> tuple[dict[str, WorkerConfig], dict[str, Any]]:
    """Each family's worker settings: its fastest candidate on ``shape`` (its first shape
    when it has one candidate, or with ``--no-sweep``), and the sweep's runs."""
    chosen: dict[str, WorkerConfig] = {}
    record: dict[str, Any] = {}
    for family in families:
        if not ctx.sweep or (len(family.shapes) == 1 and not family.variations):
            chosen[family.name] = family.shapes[0]
            record[family.name] = {
                "why": family.why, "chosen": family.shapes[0].label,
                "chosen_config": asdict(family.shapes[0]),
                "candidates": [], "swept": False,
            }
            continue
        chosen[family.name], record[family.name] = _sweep_family(ctx, family, shape)
        record[family.name]["swept"] = True
        ctx.log(f"  sweep {family.name}: chose {chosen[family.name].label}")
    return chosen, record


def _vendor_check(ctx: Context, in_flight: int) -> dict[str, Any]:
    """The vendor's own capacity at the regime's latency with ``in_flight`` connections: it
    must not be what caps the contenders."""
    from benchmarks.vendorload import vendor_capacity

    ctx.env.flush()
    per_connection = 5 if ctx.quick else VENDOR_CHECK_REQUESTS_PER_CONNECTION
    found = vendor_capacity(ctx.env.vendor_handle, connections=in_flight,
                            requests=in_flight * per_connection,
                            seconds=VENDOR_CHECK_SECONDS)
    ctx.log(f"  vendor capacity: {found['rate_per_s']:,.0f} requests/s over {in_flight:,} "
            f"connections at {found['latency_ms']:g} ms (ideal {found['ideal_per_s']:,.0f}/s), "
            f"{found['vendor_cpu_ms_per_request']:.3f} ms vendor CPU per request, "
            f"{found['failed']} failed")
    return found


def _sweep_table(record: dict[str, Any], shape: Shape) -> Table:
    table = Table(
        f"Worker settings sweep: {shape.label} = {shape.total:,} metric-days, "
        f"{LATENCY_MS:g} ms vendor latency, fanout's leaf code, one run each",
        ["family", "candidate", "metric-days/s", "leaf phase /s", "worker CPU ms / leaf",
         "worker RSS MiB", "chosen"],
        caption="worker shapes first, then variations of the fastest; the fastest is chosen",
    )
    for name, fam in record.items():
        for cand in fam["candidates"]:
            if "rate" not in cand:
                table.rows.append([name, cand["config"], "FAILED", "-", "-", "-", ""])
                continue
            table.rows.append([
                name, cand["config"], fmt_rate(cand["rate"]), fmt_rate(cand["leaf_phase_rate"]),
                _num(cand["worker_cpu_ms_per_item"]),
                "-" if cand["worker_rss_bytes"] is None else _mib(cand["worker_rss_bytes"]),
                "yes" if cand["config"] == fam["chosen"] else "",
            ])
    return table


def harvest(ctx: Context) -> SuiteResult:
    shape = QUICK_SHAPE if ctx.quick else FULL_SHAPE
    repeats = ctx.repeats_or(HARVEST_REPEATS)
    regime = regimes.regime_of(LATENCY_MS)
    in_flight = regimes.IN_FLIGHT
    sample = NAIVE_SAMPLE_QUICK if ctx.quick else NAIVE_SAMPLE
    sweep_shape = SWEEP_SHAPE_QUICK if ctx.quick else SWEEP_SHAPE[regime]
    families = regimes.families(regime, LATENCY_MS, ctx.cpu_count, in_flight)
    result = SuiteResult("harvest", settings={
        "shape": {**asdict(shape), "total": shape.total}, "latency_ms": LATENCY_MS,
        "regime": regime, "repeats": repeats, "interleaved": True, "rotated": True,
        "end_day": END_DAY, "http_retries": 0, "warmup_shape": asdict(WARMUP),
        "naive_sample": sample, "sleep_leaf_s": leaf.SLEEP_S, "sweep": ctx.sweep,
        "sweep_shape": {**asdict(sweep_shape), "total": sweep_shape.total},
    })
    if regime == regimes.IN_FLIGHT_REGIME:
        result.settings["in_flight"] = in_flight
        result.figures["vendor_capacity"] = _vendor_check(ctx, in_flight)
    chosen, sweep = choose_configs(ctx, families, sweep_shape)
    result.figures["sweep"] = sweep
    contenders = harvest_contenders(regime, chosen)
    result.settings["contenders"] = {
        c.name: {"leaf": c.leaf, "leaf_work": leaf.KINDS[c.leaf], "ratio_against": c.reference,
                 "workers": c.config.label if c.config else "1 thread in the driver",
                 "config": asdict(c.config) if c.config else None}
        for c in contenders}
    ctx.log(f"  {len(contenders)} contenders x {repeats} round(s), interleaved and rotated")
    measurements, errors, order = run_interleaved(ctx, contenders, shape, repeats,
                                                  naive_sample=sample)
    result.errors += [f"{name}: {error}" for name, error in errors.items()]
    ratios, per_round = _ratios(contenders, measurements)

    def medians(attr: str) -> dict[str, Any]:
        return {k: getattr(m, attr) for k, m in measurements.items()
                if getattr(m, attr) is not None}

    ceilings = {c.name: thread_ceiling(c.config) for c in contenders if c.config}
    result.figures.update({
        "metric_days_per_s": medians("rate"),
        "leaf_phase_per_s": {k: m.stats["leaf_phase_rate"]["median"]
                             for k, m in measurements.items() if "leaf_phase_rate" in m.stats},
        "in_flight_ceiling_per_s": ceilings,
        "ratios": ratios,
        "ratios_per_round": per_round,
        "worker_cpu_ms_per_metric_day": medians("worker_cpu_ms_per_item"),
        "redis_cpu_ms_per_metric_day": medians("redis_cpu_ms_per_item"),
        "vendor_cpu_ms_per_metric_day": medians("vendor_cpu_ms_per_item"),
        "worker_rss_bytes": medians("worker_rss_bytes"),
        "spread": {k: m.stats for k, m in measurements.items()},
        "order": [f"{round_no}:{name}" for round_no, name in order],
        "failed": errors,
        "measurements": {k: m.as_json() for k, m in measurements.items()},
    })
    if sweep and any(f.get("swept") for f in sweep.values()):
        result.tables.append(_sweep_table(sweep, sweep_shape))
    result.tables.append(_harvest_table(ctx, regime, shape, repeats, contenders, measurements,
                                        ratios, ceilings, result.figures.get("vendor_capacity")))
    return result


def _harvest_table(
    ctx: Context, regime: str, shape: Shape, repeats: int, contenders: Sequence[Contender],
    measurements: dict[str, Measurement], ratios: dict[str, float | None],
    ceilings: dict[str, float | None], vendor: dict[str, Any] | None,
) -> Table:
    leaf_labels = {"fanout": "fanout's", "client": "client+INSERT",
                   "sleep": f"sleep {leaf.SLEEP_S * 1000:.0f} ms"}
    if LATENCY_MS <= 0:
        bound = "no vendor latency: CPU alone bounds every contender"
    else:
        bound = (f"ceiling = calls in flight / {LATENCY_MS:g} ms, whatever the framework")
    if vendor is not None:
        bound += (f"; the vendor alone served {vendor['rate_per_s']:,.0f} requests/s over "
                  f"{vendor['connections']:,} connections (ideal {vendor['ideal_per_s']:,.0f})")
    table = Table(
        f"Harvest throughput ({regime} regime): {shape.label} = {shape.total:,} metric-days, "
        f"{LATENCY_MS:g} ms vendor latency",
        ["contender", "workers", "leaf code", "metric-days/s", "leaf phase /s", "ceiling /s",
         "fanout / this", "worker CPU ms / leaf", "Redis CPU ms / leaf",
         "vendor CPU ms / leaf", "worker RSS MiB", "other+steal cores"],
        caption=f"median [min-max] of {repeats} interleaved round(s), the order rotated each "
                f"round (each run on fresh workers); leaf phase = the rate from "
                f"{LEAF_PHASE[0]:.0%} to {LEAF_PHASE[1]:.0%} of the leaves done; {bound}; "
                "fanout / this = ratio of medians, against fanout-sleep for the "
                "sleep rows; workers: processes x pool concurrency (per process), then "
                "Celery's prefetch multiplier (pf), how it sends children (each: one .delay() "
                "per child; group; chunks:N) and whether it sends task events (-E; fanout "
                "always does); leaf code: fanout's = workers.http.request_json + "
                "SqliteSink (async actors: the same GET on aiohttp), client+INSERT = shared "
                "httpx.Client + plain INSERT; naive: 1 thread, sampled and extrapolated, its "
                f"own CPU as worker CPU; machine: {ctx.cpu_count} cores",
    )
    for c in contenders:
        m = measurements.get(c.name)
        workers = c.config.short_label if c.config else "1 thread"
        ceiling = ceilings.get(c.name)
        ceiling_text = "-" if ceiling is None else fmt_rate(ceiling)
        if m is None:
            table.rows.append([c.name, workers, leaf_labels[c.leaf], "FAILED", "-",
                               ceiling_text, "-", "-", "-", "-", "-", "-"])
            continue
        ratio = 1.0 if c.name == c.reference else ratios.get(f"{c.reference}/{c.name}")
        noise = _spread([_noise(r["cores_used"]) for r in m.runs])
        table.rows.append([
            c.name, workers, leaf_labels[c.leaf],
            fmt_spread(m.stats, "rate", fmt_rate), fmt_spread(m.stats, "leaf_phase_rate", fmt_rate),
            ceiling_text,
            "-" if ratio is None else f"{ratio:.2f}x",
            fmt_spread(m.stats, "worker_cpu_ms_per_item", _ms),
            fmt_spread(m.stats, "redis_cpu_ms_per_item", _ms),
            fmt_spread(m.stats, "vendor_cpu_ms_per_item", _ms),
            fmt_spread(m.stats, "worker_rss_bytes", _mib),
            fmt_spread({"n": noise}, "n", _ms) if noise else "-",
        ])
    return table


def pools(ctx: Context) -> SuiteResult:
    shape = POOLS_SHAPE_QUICK if ctx.quick else POOLS_SHAPE
    repeats = ctx.repeats_or(1)
    result = SuiteResult("pools", settings={
        "shape": {**asdict(shape), "total": shape.total}, "latency_ms": LATENCY_MS,
        "configs": [asdict(c) for c in POOL_CONFIGS], "repeats": repeats, "interleaved": True,
        "skipped_configs": {"gevent": "not tried: fanout's workers run threads or prefork"},
    })
    contenders = [Contender(c.label, "fanout", FanoutHarness, c) for c in POOL_CONFIGS]
    by_label, errors, _ = run_interleaved(ctx, contenders, shape, repeats, label="pools")
    result.errors += [f"{name}: {error}" for name, error in errors.items()]
    measurements = list(by_label.values())
    best = max(measurements, key=lambda m: m.rate, default=None)
    result.figures = {
        "metric_days_per_s": {m.contender: m.rate for m in measurements},
        "best": best.contender if best else None,
        "measurements": [m.as_json() for m in measurements],
    }
    table = Table(
        f"fanout pool settings: {shape.label} = {shape.total:,} metric-days on "
        f"{ctx.cpu_count} cores",
        ["workers", "metric-days/s", "vs best", "worker CPU ms / leaf", "Redis CPU ms / leaf",
         "worker RSS MiB", "other+steal cores"],
        caption=f"gevent: not tried (fanout's workers run threads or prefork); median "
                f"[min-max] of {repeats} interleaved "
                "round(s)",
    )
    for m in measurements:
        noise = _spread([_noise(r["cores_used"]) for r in m.runs])
        table.rows.append([
            m.contender + ("  (best)" if m is best else ""),
            fmt_spread(m.stats, "rate", fmt_rate),
            f"{m.rate / best.rate:.2f}x" if best else "-",
            fmt_spread(m.stats, "worker_cpu_ms_per_item", _ms),
            fmt_spread(m.stats, "redis_cpu_ms_per_item", _ms),
            fmt_spread(m.stats, "worker_rss_bytes", _mib),
            fmt_spread({"n": noise}, "n", _ms) if noise else "-",
        ])
    result.tables.append(table)
    return result
