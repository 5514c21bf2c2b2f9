"""Trigger one run of a pipeline: list its root items, register them, publish them."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

from producers.errors import CliError
from workers.api import Pipeline, get_pipeline, load_pipelines
from workers.engine import batch_maps
from workers.engine.services import services
from workers.ids import item_id
from workers.ledger import LedgerError
from workers.message import Delivery
from workers.policy.kill_switch import Switch, to_spec
from workers.settings import ConfigError, get_settings
from workers.stage_config import apply_config_file_once
from workers.throttle import Throttled


class TriggerError(CliError):
    """The run could not start (e.g. the vendor would not list the root items)."""


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


_LIST_ROOTS_WAIT_S = 300.0


def _list_roots(list_roots: Callable[[dict[str, Any]], Sequence[Any]],
                params: dict[str, Any]) -> list[Any]:
    """The roots function, run in this process: a global limit that holds it is waited out
    here (there is no scheduler to hand it to), for up to five minutes."""
    deadline = time.monotonic() + _LIST_ROOTS_WAIT_S
    while True:
        try:
            return list(list_roots(params))
        except Throttled as held:
            if time.monotonic() + held.wait_s > deadline:
                raise
            time.sleep(held.wait_s)


def load_configured_pipelines() -> None:
    """Import the built-in pipelines and FANOUT_PIPELINES (a bad module: ConfigError), with
    the config file's stage settings over their own, read once (a bad one: ConfigError)."""
    load_pipelines(get_settings().pipeline_modules)
    apply_config_file_once()


def root_stage_of(pipeline: Pipeline, given: str | None = None) -> str:
    """The stage that root items given as data go to: ``given``; else the stage the
    pipeline's roots function feeds; else its only stage that no other stage maps to.
    Where several could be, none is guessed: the ConfigError names them."""
    if given is not None:
        if given not in pipeline.stages:
            raise ConfigError(f"pipeline {pipeline.name!r} has no stage {given!r} (stages: "
                              f"{', '.join(pipeline.stages) or 'none'})")
        return given
    if pipeline.root_stage is not None:
        return pipeline.root_stage
    if not pipeline.stages:
        raise ConfigError(f"pipeline {pipeline.name!r} has no stages")
    children = {stage.maps_to for stage in pipeline.stages.values()}
    heads = [name for name in pipeline.stages if name not in children]
    if len(heads) == 1:
        return heads[0]
    could = ", ".join(heads or pipeline.stages)
    raise ConfigError(f"pipeline {pipeline.name!r} has several stages root items could go to "
                      f"({could}): name one (fanout run --root-stage, root_stage in a "
                      "schedule, start_run(root_stage=...))")


def start_run(
    pipeline_name: str,
    params: dict[str, Any],
    *,
    roots: Sequence[Any] | None = None,
    root_stage: str | None = None,
    run_id: str | None = None,
    batch_size: int | None = None,
    kill_switch: Switch | None = None,
    per_item: bool = False,
    priority: int | None = None,
) -> str:
    """Start a run and return its id. Root items come from the pipeline's roots function,
    or are given (``roots``, Prefect's ``task.map(items)``) for ``root_stage`` (by default
    ``root_stage_of``'s choice). They are published only after the run exists. With a
    ``run_id`` that exists already (a schedule slot fired twice), nothing more happens.
    ``batch_size``: the roots are a batch map (prefecto's ``BatchTask``) with an optional
    ``kill_switch``, checked after every batch and, with ``per_item``, after every item.
    ``priority``: the run's weight in the fair share of the workers between runs on the same
    stage (``check_priority``; 1 by default): a run of priority 3 gets 3 items run for each
    item of a priority-1 run waiting beside it."""
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ConfigError(f"batch size must be a whole number >= 1, got {batch_size!r}")
    if priority is not None:
        check_priority(priority)
    load_configured_pipelines()
    pipeline = get_pipeline(pipeline_name)
    if pipeline.check_params:
        params = pipeline.check_params(params)
    if roots is None:
        if pipeline.list_roots is None or pipeline.root_stage is None:
            raise ConfigError(f"pipeline {pipeline_name!r} has no roots function: give its "
                              "root items as data (fanout run --items FILE, items or "
                              "items_file in a schedule, start_run(roots=...))")
        if root_stage is not None:
            raise ConfigError(f"a root stage ({root_stage!r}) is for root items given as "
                              f"data: pipeline {pipeline_name!r} lists its own")
        root_stage = pipeline.root_stage
        try:
            roots = _list_roots(pipeline.list_roots, params)
        except ConfigError:
            raise
        except Exception as exc:
            raise TriggerError(f"cannot list the root items of {pipeline_name!r}: {exc}") from exc
    else:
        root_stage = root_stage_of(pipeline, root_stage)
    run_id = run_id or new_run_id()
    stage = pipeline.stages[root_stage]
    deliveries = [
        Delivery(stage.task_name, run_id, item_id(stage.name, run_id, i, root), root)
        for i, root in enumerate(roots)
    ]
    svc = services()
    if batch_size is not None:
        if svc.ledger.runs.create(run_id, pipeline.name, params, stage.name, [], hold=True):
            _set_priority(run_id, priority)
            spec = None if kill_switch is None else to_spec(kill_switch)
            batch_maps.start(svc, stage, run_id, run_id, list(roots), batch_size, spec,
                             per_item, as_roots=True)
        return run_id
    entries = [(d.item_id, d.payload) for d in deliveries]
    if svc.ledger.runs.create(run_id, pipeline.name, params, stage.name, entries):
        _set_priority(run_id, priority)
        # Should this process die here, the reaper publishes the roots from the ledger.
        svc.transport.publish(deliveries)
    return run_id


MAX_PRIORITY = 100


def check_priority(priority: object) -> int:
    """A run's priority: a whole number from 1 to ``MAX_PRIORITY`` (else ConfigError)."""
    if isinstance(priority, bool) or not isinstance(priority, int) \
            or not 1 <= priority <= MAX_PRIORITY:
        raise ConfigError(f"priority must be a whole number from 1 to {MAX_PRIORITY}, "
                          f"got {priority!r}")
    return priority


def _set_priority(run_id: str, priority: int | None) -> None:
    """Written before anything of the run is published: the run's lane on each stage queue
    takes it as its weight (``lua/publish.lua``)."""
    if priority is not None and priority != 1:
        services().transport.set_priority(run_id, priority)


def stage_order(pipeline: Pipeline, root_stage: str | None = None) -> list[str]:
    """The stages a run shows, in order: the pipeline's own order, or for a run whose given
    items went to another stage, that stage down its ``maps_to`` chain (stages it reaches
    otherwise show up once they count something)."""
    order = pipeline.stage_order()
    if root_stage is None or order[:1] == [root_stage]:
        return order
    order = []
    current: str | None = root_stage
    while current and current in pipeline.stages and current not in order:
        order.append(current)
        current = pipeline.stages[current].maps_to
    return order


def replay_run(run_id: str, *, stage: str | None = None, item: str | None = None) -> int:
    """Publish a run's failed items again (all, or those of ``stage``, or one ``item``) into
    the same run, which reopens and finishes again. Returns how many."""
    svc = services()
    snap = svc.ledger.view.snapshot(run_id)
    if snap is None:
        raise TriggerError(f"run {run_id} is unknown or expired")
    load_configured_pipelines()
    pipeline = get_pipeline(snap.pipeline)
    if stage is not None and stage not in pipeline.stages:
        raise ConfigError(f"pipeline {snap.pipeline!r} has no stage {stage!r}")
    failed = svc.ledger.view.failures(run_id)
    if item is not None and item not in failed:
        raise TriggerError(f"item {item!r} did not fail in run {run_id}")
    chosen = {
        failed_id: failure["item"] for failed_id, failure in failed.items()
        if (stage is None or failure["stage"] == stage) and item in (None, failed_id)
    }
    try:
        replayed = svc.ledger.runs.replay(run_id, chosen)
    except LedgerError as exc:
        raise TriggerError(str(exc)) from None
    svc.transport.publish([
        Delivery(pipeline.stages[failed[i]["stage"]].task_name, run_id, i, chosen[i])
        for i in replayed
    ])
    return len(replayed)
