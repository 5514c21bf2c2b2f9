"""The hooks a stage's own options ask for (``cache=``, ``limits=``, ``retries=``...), built
by the hook modules that own those options: each module reads its ``OPTIONS`` (declared in the
policy layer, where ``Pipeline.stage`` checks them: ``api.STAGE_OPTIONS``) out of
``Stage.options`` in its ``for_stage``, so the runner builds a stage's hooks without knowing
any in particular. A new option-owning hook is one more entry here and in ``STAGE_OPTIONS``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import redis

from workers.engine import cache_hook, limit_hook, retry_hook
from workers.hooks import Hook
from workers.options import OptionGroup

if TYPE_CHECKING:
    from workers.api import Stage


class OptionOwner(Protocol):
    """A hook module: the options it owns, and the hooks they ask for on one stage."""

    OPTIONS: OptionGroup

    def for_stage(self, stage: Stage, client: redis.Redis) -> Sequence[Hook]: ...

#: In this order, after the pipeline's and the stage's own hooks: the cache before the limits,
#: so a served item takes nothing from a limit; retries last, deciding only on a failure.
STAGE_HOOKS: tuple[OptionOwner, ...] = (cache_hook, limit_hook, retry_hook)


def hooks_for(stage: Stage, client: redis.Redis) -> tuple[Hook, ...]:
    """The hooks of ``stage``'s own options, in ``STAGE_HOOKS`` order."""
    built: list[Hook] = []
    for owner in STAGE_HOOKS:
        built.extend(owner.for_stage(stage, client))
    return tuple(built)
