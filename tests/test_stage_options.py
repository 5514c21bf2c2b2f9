"""Stage options owned by hooks: ``Pipeline.stage`` checks what it is given against the
options each owner declares (an unknown one refused, a bad value refused by its owner), keeps
them in ``Stage.options``, and the engine builds the built-in hooks in the documented order."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import redis

from workers import api
from workers.api import Hook, OptionGroup, PermanentError, Pipeline, StageContext, exponential
from workers.engine import cache_hook, limit_hook, retry_hook
from workers.engine.cache_hook import CacheHook
from workers.engine.limit_hook import LimitHook
from workers.engine.retry_hook import RetryHook
from workers.engine.stage_hooks import STAGE_HOOKS, hooks_for
from workers.hooks import HookCalls, Retry
from workers.looping import LoopLimitExceeded
from workers.policy.retry import RetryAfter, RetryPolicy
from workers.settings import ConfigError

KNOWN = ("cache, cache_key, cache_ttl_s, claim_batch, hooks, limits, maps_to, max_iterations, "
         "retries, retry_delay_s, retry_if, retry_jitter, retry_on")
DEFAULTS = {"cache": None, "cache_key": None, "cache_ttl_s": 86_400.0, "limits": (),
            "retries": 0, "retry_delay_s": 1.0, "retry_jitter": 0.0, "retry_on": Exception,
            "retry_if": None}


def leaf(ctx: StageContext, item: Any) -> Any:
    return item


def register(pipeline: Pipeline, **options: Any) -> api.Stage:
    pipeline.stage("leaf", **options)(leaf)
    return pipeline.stages["leaf"]


def refusal(pipeline: Pipeline, **options: Any) -> str:
    with pytest.raises(ConfigError) as refused:
        register(pipeline, **options)
    return str(refused.value)


def test_an_unknown_option_is_refused_naming_the_stage_the_option_and_the_known_ones() -> None:
    flow = Pipeline("opts_unknown")
    assert refusal(flow, retires=3) == (
        f"stage opts_unknown.leaf: unknown option 'retires', did you mean 'retries'? "
        f"(known: {KNOWN})"
    )
    assert refusal(flow, colour="red") == (
        f"stage opts_unknown.leaf: unknown option 'colour' (known: {KNOWN})"
    )
    assert refusal(flow, max_iteration=5) == (
        f"stage opts_unknown.leaf: unknown option 'max_iteration', did you mean "
        f"'max_iterations'? (known: {KNOWN})"
    )
    assert flow.stages == {}  # nothing registered


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cache": "outputs"}, "cache must be 'inputs', got 'outputs'"),
        ({"cache_ttl_s": 0}, "cache_ttl_s must be > 0 seconds, got 0"),
        ({"cache_ttl_s": "1h"}, "cache_ttl_s must be > 0 seconds, got '1h'"),
        ({"cache_key": "id"}, "cache_key must be a callable (ctx, item) -> str, got 'id'"),
        ({"limits": "github-api"}, "limits must be a list of limit names, got 'github-api'"),
        ({"limits": ["ok", ""]}, "limits must be a list of limit names, got ['ok', '']"),
        ({"retries": -1}, "retries must be a whole number >= 0, got -1"),
        ({"retry_jitter": 1.5}, "retry_jitter must be a fraction in [0, 1], got 1.5"),
        ({"retry_on": ValueError()}, "retry_on must be one or more exception types, "
                                     "got ValueError()"),
    ],
)
def test_a_bad_value_is_refused_by_the_option_s_owner(
    options: dict[str, Any], message: str
) -> None:
    assert refusal(Pipeline("opts_bad"), **options) == f"stage opts_bad.leaf: {message}"


def test_a_pipeline_module_with_a_typo_is_one_line_and_exit_2_from_the_cli() -> None:
    env = {**os.environ, "FANOUT_PIPELINES": "typo_pipelines",
           "PYTHONPATH": str(Path(__file__).resolve().parent)}
    result = subprocess.run([sys.executable, "-m", "producers.cli", "status"],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2, result
    assert result.stderr.strip().splitlines() == [
        "fanout: error: cannot import pipeline module 'typo_pipelines': stage typo.leaf: "
        f"unknown option 'retires', did you mean 'retries'? (known: {KNOWN})"
    ]


def test_the_stage_keeps_every_declared_option_with_its_default() -> None:
    assert register(Pipeline("opts_defaults")).options == DEFAULTS
    delay = exponential(0.5, 2, 30)
    stage = register(Pipeline("opts_given"), retries=3, retry_delay_s=delay, limits=["api"],
                     cache="inputs", claim_batch=4)
    assert stage.options == {**DEFAULTS, "retries": 3, "retry_delay_s": delay,
                             "limits": ["api"], "cache": "inputs"}
    assert stage.claim_batch == 4  # an engine option, not one of a hook's
    with pytest.raises(TypeError):
        stage.options["retries"] = 0  # type: ignore[index]  # read-only once registered


def test_each_declared_group_accepts_its_own_defaults_and_names_its_owner() -> None:
    for group in api.STAGE_OPTIONS:
        group.check(group.defaults)  # raises if a default is not valid
    assert [(g.owner, g.names) for g in api.STAGE_OPTIONS] == [
        ("cache", ("cache", "cache_key", "cache_ttl_s")),
        ("limits", ("limits",)),
        ("retry", ("retries", "retry_delay_s", "retry_jitter", "retry_on", "retry_if")),
    ]


def test_the_built_in_hooks_run_cache_then_limits_then_retry() -> None:
    # The engine's hook modules and the options the API checks are the same groups, in order.
    assert list(STAGE_HOOKS) == [cache_hook, limit_hook, retry_hook]
    assert tuple(owner.OPTIONS for owner in STAGE_HOOKS) == api.STAGE_OPTIONS
    stage = register(Pipeline("opts_order"), retries=2, limits=["a", "b"], cache="inputs")
    built = hooks_for(stage, redis.Redis())  # building connects to nothing
    assert [type(h) for h in built] == [CacheHook, LimitHook, LimitHook, RetryHook]
    assert [h.name for h in built if isinstance(h, LimitHook)] == ["a", "b"]
    retry = built[-1]
    assert isinstance(retry, RetryHook) and retry.policy == RetryPolicy(retries=2)
    # A stage that asks for none of them gets none.
    assert hooks_for(register(Pipeline("opts_plain")), redis.Redis()) == ()


def ctx_at(attempt: int) -> StageContext:
    return StageContext("run", "item", "p", "s", {}, attempt)


class Vendor429(RetryAfter):
    def __init__(self, retry_after_s: float) -> None:
        super().__init__("429")
        self.retry_after_s = retry_after_s


def test_the_retry_hook_decides_retry_after_a_delay_or_final() -> None:
    hook = RetryHook(RetryPolicy(retries=2, delay_s=[1, 5]))
    assert hook.retry(ctx_at(1), 0, ValueError()) == Retry(1.0)
    assert hook.retry(ctx_at(2), 0, ValueError()) == Retry(5.0)
    assert hook.retry(ctx_at(3), 0, ValueError()) is None  # retries spent
    assert hook.retry(ctx_at(1), 0, PermanentError()) is None
    assert hook.retry(ctx_at(1), 0, LoopLimitExceeded()) is None
    # Never sooner than the vendor asked, never later than the policy when it asked less.
    assert hook.retry(ctx_at(1), 0, Vendor429(7.5)) == Retry(7.5)
    assert hook.retry(ctx_at(2), 0, Vendor429(0.5)) == Retry(5.0)


def test_a_retry_if_that_raises_means_no_retry_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(exc: BaseException) -> bool:
        raise RuntimeError("retry_if broke")

    hook = RetryHook(RetryPolicy(retries=3, retry_if=broken))
    with caplog.at_level(logging.ERROR, logger="fanout"):
        assert hook.retry(ctx_at(1), 0, ValueError()) is None
    assert [r.getMessage() for r in caplog.records] == ["p.s item: retry_if raised (no retry)"]


class AskRetry(Hook):
    def __init__(self, delay_s: float | None) -> None:
        self.delay_s = delay_s

    def retry(self, ctx: StageContext, item: Any, exc: BaseException) -> Retry | None:
        return None if self.delay_s is None else Retry(self.delay_s)


class BrokenRetry(Hook):
    def retry(self, ctx: StageContext, item: Any, exc: BaseException) -> Retry | None:
        raise RuntimeError("broke")


def test_the_first_hook_that_asks_for_a_retry_decides_and_a_raising_one_is_passed_over(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = HookCalls([AskRetry(None), BrokenRetry(), AskRetry(2.0), AskRetry(9.0)])
    with caplog.at_level(logging.ERROR, logger="fanout.hooks"):
        assert calls.retry(ctx_at(1), 0, ValueError()) == Retry(2.0)
    assert len(caplog.records) == 1 and "BrokenRetry.retry() raised" in caplog.text
    # Every hook is asked, not only those whose before() ran (a before may be what raised).
    assert calls.entered == []
    assert HookCalls([AskRetry(None), Hook()]).retry(ctx_at(1), 0, ValueError()) is None
    # A decision that cannot be applied is refused where it is made.
    with pytest.raises(ValueError, match="Retry delay_s must be seconds >= 0, got -1"):
        Retry(-1)


def check_tag(options: Mapping[str, Any]) -> None:
    if options["tag"] is not None and not isinstance(options["tag"], str):
        raise ValueError(f"tag must be a string, got {options['tag']!r}")


class Tagger(Hook):
    OPTIONS = OptionGroup("tagger", {"tag": None}, check_tag)


class Clashing(Hook):
    OPTIONS = OptionGroup("clashing", {"retries": 1}, lambda options: None)


def test_a_user_hook_declares_stage_options_of_its_own() -> None:
    tagged = Pipeline("opts_tagged", hooks=[Tagger()])
    assert register(tagged, tag="blue").options == {**DEFAULTS, "tag": "blue"}
    assert register(Pipeline("opts_tagged_here"), hooks=[Tagger()]).options == {
        **DEFAULTS, "tag": None,
    }
    assert refusal(Pipeline("opts_tag_bad", hooks=[Tagger()]), tag=3) == (
        "stage opts_tag_bad.leaf: tag must be a string, got 3"
    )
    # Without the hook the option is unknown.
    assert refusal(Pipeline("opts_untagged"), tag="blue") == (
        f"stage opts_untagged.leaf: unknown option 'tag' (known: {KNOWN})"
    )
    assert refusal(Pipeline("opts_clash", hooks=[Clashing()])) == (
        "stage opts_clash.leaf: option 'retries' is declared twice (retry, clashing)"
    )
