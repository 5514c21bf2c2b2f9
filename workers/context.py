"""``StageContext``: what a stage function may use besides its item."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from workers.looping import LoopState
from workers.policy.kill_switch import Switch, to_spec


@dataclass
class StageContext:
    """The item's run (``run_id``, ``params``), its id, its stage, its ``attempt`` (from 1),
    its loop state (``loop.payload``, ``loop.iteration``), and the way to fan out (``map``,
    ``batch_map``)."""

    run_id: str
    item_id: str
    pipeline: str
    stage: str
    params: dict[str, Any]
    attempt: int = 1
    loop: LoopState = field(default_factory=LoopState)
    #: The stages ``map`` may fan out to (the pipeline's).
    stages: frozenset[str] = frozenset()
    #: What ``map`` collected: the engine publishes it after the stage returns.
    children: dict[str, list[Any]] = field(default_factory=dict)
    #: What ``batch_map`` asked for, likewise.
    batch_maps: list[dict[str, Any]] = field(default_factory=list)

    @property
    def task_name(self) -> str:
        return f"{self.pipeline}.{self.stage}"

    def map(self, stage: str, items: Sequence[Any]) -> int:
        """Fan out: one message per element of ``items`` for ``stage``, published once the
        stage returns (before the item counts as done). Returns how many."""
        self._check_stage(stage)
        self.children.setdefault(stage, []).extend(items)
        return len(items)

    def batch_map(
        self, stage: str, items: Sequence[Any], *, size: int, kill_switch: Switch | None = None,
        per_item: bool = False,
    ) -> int:
        """Fan out in batches of ``size`` (prefecto's ``BatchTask``): batch k+1 is published
        when every item of batch k is done, unless ``kill_switch`` (``AnyFailed()``,
        ``FailureCount(n)``, ``FailureRate(min_sample, rate)`` or an importable function of
        ``Counts``) trips; checked after every batch, and after every item with
        ``per_item``. Returns how many items."""
        self._check_stage(stage)
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"batch size must be a whole number >= 1, got {size!r}")
        self.batch_maps.append({
            "stage": stage, "items": list(items), "size": size, "per_item": per_item,
            "switch": None if kill_switch is None else to_spec(kill_switch),
        })
        return len(items)

    def _check_stage(self, stage: str) -> None:
        if stage not in self.stages:
            known = ", ".join(sorted(self.stages))
            raise ValueError(f"{self.pipeline} has no stage {stage!r} to map to (has {known})")
