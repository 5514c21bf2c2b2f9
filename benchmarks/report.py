"""The rich table on the terminal and the JSON results file."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table as RichTable

from benchmarks.core import SuiteResult

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def versions(server: str) -> dict[str, str]:
    found = {"python": platform.python_version(), "redis_server": server}
    for package in ("celery", "kombu", "redis", "dramatiq", "httpx", "gevent", "greenlet",
                    "aiohttp"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def machine() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python_executable": sys.executable,
        "loadavg_at_start": os.getloadavg(),
    }


def code_state() -> dict[str, Any]:
    """The commit measured and the files that differed from it (others edit the tree)."""
    import subprocess

    root = RESULTS_DIR.parent.parent

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                  timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    # Porcelain lines are "XY path": the status columns may start with a space. Result files
    # are what runs write, not code.
    changed = [line[3:] for line in git("status", "--porcelain").splitlines()
               if line[3:] and not line[3:].startswith("benchmarks/results/")]
    return {"commit": git("rev-parse", "HEAD").strip(), "changed_files": changed}


def default_path(started: dt.datetime) -> Path:
    return RESULTS_DIR / f"{started.strftime('%Y%m%dT%H%M%SZ')}.json"


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")


def suite_json(result: SuiteResult) -> dict[str, Any]:
    data = asdict(result)
    data.pop("tables")
    return data


def render(console: Console, results: list[SuiteResult], header: str) -> None:
    console.rule(header)
    for result in results:
        if result.status == "skipped":
            console.print(f"[yellow]{result.name}: skipped[/yellow] — {result.reason}")
            continue
        for table in result.tables:
            # Tables hold plain text: "median [min-max]" is not rich markup.
            rich_table = RichTable(title=escape(table.title), caption=escape(table.caption),
                                   title_justify="left")
            for i, column in enumerate(table.columns):
                rich_table.add_column(escape(column), justify="left" if i == 0 else "right")
            for row in table.rows:
                rich_table.add_row(*(escape(cell) for cell in row))
            console.print(rich_table)
        if result.status == "error":
            console.print(f"[red]{result.name}: ERROR[/red] — {result.reason}")
        console.print(
            f"[dim]{result.name}: {result.wall_s:.1f} s, load average "
            f"{result.loadavg_before[0]:.2f} -> {result.loadavg_after[0]:.2f}[/dim]"
        )
