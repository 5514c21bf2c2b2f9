"""What every suite gets (``Context``) and returns (``SuiteResult``)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console

from benchmarks.env import BenchEnv


class BenchmarkError(Exception):
    """A measurement that did not do the work it claims: no number is reported for it."""


def chosen_from_env(variable: str, known: Sequence[str]) -> list[str]:
    """The names listed in ``variable`` (comma-separated; unset or empty: all of ``known``),
    in ``known``'s order; a name it does not know is a BenchmarkError."""
    chosen = [name.strip() for name in os.environ.get(variable, "").split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        raise BenchmarkError(f"{variable}: unknown {', '.join(unknown)} "
                             f"(known: {', '.join(known)})")
    return [name for name in known if not chosen or name in chosen]


@dataclass
class Table:
    """One table of the report: a title, column names and rows of display strings."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    caption: str = ""


@dataclass
class SuiteResult:
    name: str
    status: str = "ok"  # ok | skipped | error
    reason: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    tables: list[Table] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    loadavg_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    loadavg_after: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass
class Context:
    env: BenchEnv
    quick: bool
    console: Console
    repeats: int | None = None  # --repeat; None: each suite's default (``repeats_or``)
    sweep: bool = True  # --no-sweep: each contender's first candidate settings, no sweep
    cpu_count: int = field(default_factory=lambda: os.cpu_count() or 1)
    results: dict[str, SuiteResult] = field(default_factory=dict)

    def repeats_or(self, default: int) -> int:
        """Timed runs per measurement: ``--repeat`` when given, else the suite's default."""
        return self.repeats if self.repeats is not None else default

    def log(self, message: str) -> None:
        self.console.log(message)


Suite = Callable[[Context], SuiteResult]


def run_suite(name: str, suite: Suite, ctx: Context) -> SuiteResult:
    """Run one suite on a fresh Redis; an exception becomes an ``error`` result, not a crash."""
    ctx.log(f"[bold]suite {name}[/bold]")
    before = os.getloadavg()
    started = time.perf_counter()
    ctx.env.flush()
    try:
        result = suite(ctx)
    except Exception as exc:  # a broken suite must not take the others down
        ctx.console.print_exception(max_frames=5)
        result = SuiteResult(name, status="error", reason=f"{type(exc).__name__}: {exc}")
    result.wall_s = round(time.perf_counter() - started, 2)
    result.loadavg_before = before
    result.loadavg_after = os.getloadavg()
    if result.errors and result.status == "ok":
        result.status = "error"
        result.reason = "; ".join(result.errors)
    return result


def fmt_rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def fmt_mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.1f}"
