"""Loop overhead — STUB, not wired up yet.

Looping (issue 3) is not merged: while ``workers.looping`` does not import, this suite is
skipped with that reason. If it imports, the suite is still skipped (to be wired up by hand).
"""

from __future__ import annotations

import importlib

from benchmarks.core import Context, SuiteResult


def loop(ctx: Context) -> SuiteResult:
    try:
        importlib.import_module("workers.looping")
    except ImportError:
        return SuiteResult("loop", status="skipped", reason="looping (issue 3) not merged yet")
    return SuiteResult(
        "loop", status="skipped",
        reason="workers.looping imports, but this suite is not wired up yet (stub)",
    )
