"""Stage options owned by hooks: each owner declares the options it reads, with their
defaults and a check, and ``Pipeline.stage`` validates what it is given against them.

The declarations live below the pipeline API (``workers.api`` may not import the engine, whose
hooks read the options), in the policy modules of their owners: ``policy.cache_options``,
``policy.limit_options``, ``policy.retry``. A user ``Hook`` may declare its own the same way
(``Hook.OPTIONS``). A typo (``retires=3``) is refused rather than ignored.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from workers.settings import ConfigError

#: Raises ValueError naming the option when a value is bad; given every option of the group.
Check = Callable[[Mapping[str, Any]], object]


@dataclass(frozen=True)
class OptionGroup:
    """The stage options one owner reads: their names and defaults, and its check."""

    owner: str
    defaults: Mapping[str, Any]
    check: Check

    @property
    def names(self) -> tuple[str, ...]:
        """The option names this group declares."""
        return tuple(self.defaults)

    def of(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """This group's options out of a stage's (its defaults where a stage gave none)."""
        return {name: options.get(name, default) for name, default in self.defaults.items()}


def validate(
    label: str, given: Mapping[str, Any], groups: Iterable[OptionGroup],
    engine: Iterable[str] = (),
) -> dict[str, Any]:
    """``given`` with every declared default filled in, each group checked by its owner.
    An unknown option or a bad value is a ConfigError naming the stage ``label``; the
    ``engine``'s own option names (given apart) are listed among the known ones."""
    groups = tuple(groups)
    declared = [name for group in groups for name in group.names]
    for name in {n for n in declared if declared.count(n) > 1}:
        owners = ", ".join(g.owner for g in groups if name in g.names)
        raise ConfigError(f"stage {label}: option {name!r} is declared twice ({owners})")
    known = sorted({*declared, *engine})
    for name in given:
        if name not in declared:
            raise ConfigError(f"stage {label}: unknown option {name!r}{_did_you_mean(name, known)}"
                              f" (known: {', '.join(known)})")
    options: dict[str, Any] = {}
    for group in groups:
        values = group.of(given)
        try:
            group.check(values)
        except ValueError as exc:
            raise ConfigError(f"stage {label}: {exc}") from None
        options.update(values)
    return options


def _did_you_mean(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f", did you mean {close[0]!r}?" if close else ""
