"""The hooks a stage's own options ask for (``cache=``, ``limits=``...), built by the hook
modules that own those options: each module names its ``OPTIONS`` and a ``for_stage``
that reads them, so the runner builds a stage's hooks without knowing any in particular.
A new option-owning hook is one more entry in ``STAGE_HOOKS``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import redis

from workers.engine import cache_hook, limit_hook
from workers.hooks import Hook

if TYPE_CHECKING:
    from workers.api import Stage

StageHooks = Callable[["Stage", redis.Redis], Sequence[Hook]]

#: In this order: the cache before the limits, so a served item takes nothing from a limit.
STAGE_HOOKS: tuple[StageHooks, ...] = (cache_hook.for_stage, limit_hook.for_stage)


def hooks_for(stage: Stage, client: redis.Redis) -> tuple[Hook, ...]:
    """The hooks of ``stage``'s own options, in ``STAGE_HOOKS`` order."""
    return tuple(hook for build in STAGE_HOOKS for hook in build(stage, client))
