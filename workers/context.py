"""``StageContext``: what a stage function may use besides its item."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from workers.looping import LoopState


@dataclass
class StageContext:
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

    @property
    def task_name(self) -> str:
        return f"{self.pipeline}.{self.stage}"

    def map(self, stage: str, items: Sequence[Any]) -> int:
        """Fan out: one message per element of ``items`` for ``stage``, published once the
        stage returns (before the item counts as done). Returns how many."""
        if stage not in self.stages:
            known = ", ".join(sorted(self.stages))
            raise ValueError(f"{self.pipeline} has no stage {stage!r} to map to (has {known})")
        self.children.setdefault(stage, []).extend(items)
        return len(items)
