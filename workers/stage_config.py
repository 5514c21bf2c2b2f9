"""Stage settings from the config file, over what the pipeline declares in Python::

    [stages."demo.metric_day"]       # or [stages.demo.metric_day]
    retries = 5
    retry_delay_s = { base_s = 0.5, factor = 2, max_s = 30 }   # exponential(0.5, 2, 30)
    limits = ["demo-vendor"]
    claim_batch = 64

Every option ``Pipeline.stage`` takes may be set, but ``maps_to`` and ``hooks`` (the shape of
the pipeline and its objects stay in Python), and each is checked by the owner that checks it
there (``workers/options.py``): an unknown one or a bad value is a ConfigError naming the file,
the stage and the option. A value set here replaces the declared one (``limits`` too: the list
is the stage's whole list); an option left out keeps the declared value.

It is applied where pipelines are loaded, before anything runs them, once per process: in
every worker (``create_app``, so a plain ``celery -A workers worker`` too) when it starts, and
in producers and beats (``producers.trigger.load_configured_pipelines``); a beat applies it
again when it reloads the file. A worker takes an edit when it is restarted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from workers.api import STAGE_OPTIONS, Pipeline, Stage, all_pipelines, get_pipeline
from workers.config_file import read_config, section
from workers.looping import DEFAULT_MAX_ITERATIONS
from workers.options import OptionGroup, did_you_mean, validate
from workers.settings import ConfigError

#: Set in Python only: the chain of stages, and hook objects.
PYTHON_ONLY = ("maps_to", "hooks")


def _check_engine(options: Mapping[str, Any]) -> None:
    for name, value in options.items():
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")


#: The engine's own stage options a config file may set (``Pipeline.stage``'s keywords).
ENGINE = OptionGroup("engine", {"claim_batch": 1, "max_iterations": DEFAULT_MAX_ITERATIONS},
                     _check_engine)

StageKey = tuple[str, str]
# Each stage as declared in Python, and the one the config made of it (to tell them apart
# when the config is applied again, e.g. by a beat that reloads it).
_DECLARED: dict[StageKey, Stage] = {}
_APPLIED: dict[StageKey, Stage] = {}
_READ: list[str] = []  # the file applied by apply_config_file, once read


def stage_tables(data: Mapping[str, Any], source: str) -> dict[str, dict[str, Any]]:
    """The ``[stages]`` section as ``{"PIPELINE.STAGE": table}``, whichever way each is
    written (a quoted ``"PIPELINE.STAGE"`` key, or a table per pipeline)."""
    found: dict[str, dict[str, Any]] = {}

    def add(label: str, table: Any) -> None:
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: stage {label}: must be a table of settings, got "
                              f"{table!r} (a stage is [stages.\"PIPELINE.STAGE\"])")
        if label in found:
            raise ConfigError(f"{source}: stage {label}: given twice")
        found[label] = table

    for key, table in section(data, "stages", source).items():
        if "." in key or not isinstance(table, dict):
            add(key, table)
            continue
        for stage, settings in table.items():  # [stages.PIPELINE.STAGE]
            add(f"{key}.{stage}", settings)
    return found


def apply_stage_settings(data: Mapping[str, Any], source: str = "config") -> list[str]:
    """Give every loaded pipeline its stages as declared in Python, with the settings of
    ``data``'s ``[stages]`` over them; all are checked before any is replaced. Returns the
    stages the config sets (``PIPELINE.STAGE``)."""
    made: dict[StageKey, Stage] = {}
    for label, table in stage_tables(data, source).items():
        pipeline, name = _find(label, source)
        made[(pipeline.name, name)] = _override(pipeline, _declared(pipeline, name), table,
                                                label, source)
    for pipeline in all_pipelines():
        for name in list(pipeline.stages):
            key = (pipeline.name, name)
            stage = made.get(key) or _declared(pipeline, name)
            pipeline.stages[name] = _APPLIED[key] = stage
    return sorted(f"{p}.{s}" for p, s in made)


def apply_config_file(path: Path | None = None) -> list[str]:
    """``apply_stage_settings`` with the config file (``FANOUT_CONFIG`` or ./fanout.toml;
    without one, the stages as declared)."""
    data, source = read_config(path)
    applied = apply_stage_settings(data, source or "config")
    _READ[:] = [source]
    return applied


def apply_config_file_once() -> None:
    """``apply_config_file``, unless this process did already: a process reads the stage
    settings when it first loads its pipelines, and only a reload reads them again (so a
    beat's runs go on with what it loaded while a bad edit waits to be fixed)."""
    if not _READ:
        apply_config_file()


def _declared(pipeline: Pipeline, name: str) -> Stage:
    key, current = (pipeline.name, name), pipeline.stages[name]
    if _APPLIED.get(key) is not current:  # not made by the config: as Python declared it
        _DECLARED[key] = current
    return _DECLARED[key]


def _find(label: str, source: str) -> tuple[Pipeline, str]:
    pipeline_name, _, name = label.partition(".")
    try:
        pipeline = get_pipeline(pipeline_name)
    except ConfigError:
        known = sorted(p.name for p in all_pipelines())
        raise ConfigError(f"{source}: stage {label}: unknown pipeline {pipeline_name!r}"
                          f"{did_you_mean(pipeline_name, known)} (known: {', '.join(known)})"
                          ) from None
    if name not in pipeline.stages:
        stages = list(pipeline.stages)
        raise ConfigError(f"{source}: stage {label}: pipeline {pipeline_name!r} has no stage "
                          f"{name!r}{did_you_mean(name, stages)} (stages: {', '.join(stages)})")
    return pipeline, name


def _override(pipeline: Pipeline, stage: Stage, table: Mapping[str, Any], label: str,
              source: str) -> Stage:
    """``stage`` with ``table``'s settings, checked by the owners of the options."""
    groups = _option_groups(pipeline, stage)
    given: dict[str, Any] = {}
    engine: dict[str, Any] = {"claim_batch": stage.claim_batch,
                              "max_iterations": stage.max_iterations}
    try:
        for name, value in table.items():
            if name in PYTHON_ONLY:
                raise ConfigError(f"stage {label}: {name} is set in Python only "
                                  f"(@pipeline.stage), not in the config file")
            if name in ENGINE.defaults:
                engine[name] = value
                continue
            convert = next((g.from_config[name] for g in groups if name in g.from_config), None)
            given[name] = convert(value) if convert else value
        options = validate(label, {**stage.options, **given}, groups, engine=ENGINE.names)
        ENGINE.check(engine)
    except ValueError as exc:
        raise ConfigError(f"{source}: stage {label}: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return replace(stage, options=MappingProxyType(options), **engine)


def _option_groups(pipeline: Pipeline, stage: Stage) -> list[OptionGroup]:
    """The option owners ``Pipeline.stage`` checked this stage with: the built-in ones, then
    those its pipeline's and its own hooks declare."""
    groups = list(STAGE_OPTIONS)
    for hook in pipeline.hooks_of(stage):
        if hook.OPTIONS is not None and hook.OPTIONS not in groups:
            groups.append(hook.OPTIONS)
    return groups
