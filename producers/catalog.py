"""``fanout pipelines [--json]``: every pipeline this process can import (the built-in ones
and ``FANOUT_PIPELINES``), each stage with its engine settings (``maps_to``, ``claim_batch``,
``max_iterations``) and its options (retries, cache, limits, a hook's own), and where root
items go: the roots function's stage, or the stage ``--items`` feeds by default."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.table import Table

from producers.trigger import root_stage_of
from workers.api import Pipeline, Stage, all_pipelines
from workers.settings import ConfigError


def describe(pipeline: Pipeline) -> dict[str, Any]:
    """One pipeline as JSON. ``items_stage``: where ``--items`` go without ``--root-stage``
    (None when several stages could take them)."""
    try:
        items_stage: str | None = root_stage_of(pipeline)
    except ConfigError:
        items_stage = None
    first = next(iter(pipeline.stages.values()), None)
    return {
        "name": pipeline.name,
        "vendor": pipeline.vendor,
        "module": first.fn.__module__ if first else None,
        "roots_function": pipeline.list_roots is not None,
        "root_stage": pipeline.root_stage,
        "items_stage": items_stage,
        "stages": [_stage(pipeline, pipeline.stages[name]) for name in pipeline.stage_order()],
    }


def _stage(pipeline: Pipeline, stage: Stage) -> dict[str, Any]:
    return {
        "name": stage.name,
        "task": stage.task_name,
        "maps_to": stage.maps_to,
        "claim_batch": stage.claim_batch,
        "max_iterations": stage.max_iterations,
        **{name: _plain(value) for name, value in stage.options.items()},
        "hooks": [_plain(type(hook)) for hook in pipeline.hooks_of(stage)],
    }


def _plain(value: Any) -> Any:
    """A stage option as JSON: functions and classes by name, other objects as an author
    writes them."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, type) or callable(value):
        module = getattr(value, "__module__", "")
        name = getattr(value, "__qualname__", repr(value))
        return name if module in ("builtins", "") else f"{module}.{name}"
    if dataclasses.is_dataclass(value):
        # As an author writes it: exponential(0.5, 2, 30)
        fields = ", ".join(repr(getattr(value, f.name)) for f in dataclasses.fields(value))
        return f"{type(value).__name__.lower()}({fields})"
    return repr(value)


def pipelines_command(args: argparse.Namespace) -> int:
    described = [describe(p) for p in sorted(all_pipelines(), key=lambda p: p.name)]
    if args.json:
        print(json.dumps(described))
        return 0
    table = Table(title="pipelines (built-in and FANOUT_PIPELINES)")
    for column in ("pipeline", "stage", "roots", "maps to", "claim batch", "max iterations",
                   "retries", "cache", "limits"):
        table.add_column(column)
    for pipeline in described:
        for n, stage in enumerate(pipeline["stages"]):
            table.add_row(
                pipeline["name"] if n == 0 else "", stage["name"], _roots(pipeline, stage),
                stage["maps_to"] or "-", str(stage["claim_batch"]), str(stage["max_iterations"]),
                _retries(stage), _cache(stage), ", ".join(stage["limits"]) or "-",
                end_section=n == len(pipeline["stages"]) - 1,
            )
    console = Console()
    if not console.is_terminal:
        console.width = 160
    console.print(table)
    console.print("roots: where a run's root items go (roots function: the pipeline lists "
                  "them; --items: the default stage of `fanout run --items FILE`)",
                  markup=False)
    return 0


def _roots(pipeline: dict[str, Any], stage: dict[str, Any]) -> str:
    if stage["name"] == pipeline["root_stage"] and pipeline["roots_function"]:
        return "roots function, --items"
    if stage["name"] == pipeline["items_stage"]:
        return "--items"
    return ""


def _retries(stage: dict[str, Any]) -> str:
    retries = stage.get("retries", 0)
    if not retries:
        return "0"
    jitter = stage["retry_jitter"]
    return f"{retries}, delay {stage['retry_delay_s']}" + (f" ±{jitter:g}" if jitter else "")


def _cache(stage: dict[str, Any]) -> str:
    if stage.get("cache") is None and stage.get("cache_key") is None:
        return "-"
    how = stage["cache_key"] or stage["cache"]
    return f"{how}, ttl {stage['cache_ttl_s']:g}s"
