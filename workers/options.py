"""Stage options owned by hooks: each owner declares the options it reads, with their
defaults and a check, and ``Pipeline.stage`` validates what it is given against them.

The declarations live below the pipeline API (``workers.api`` may not import the engine, whose
hooks read the options), in the policy modules of their owners: ``policy.cache_options``,
``policy.limit_options``, ``policy.retry``. A user ``Hook`` may declare its own the same way
(``Hook.OPTIONS``). A typo (``retires=3``) is refused rather than ignored.

The config file may set the same options (``[stages."PIPELINE.STAGE"]``, read by
``workers/stage_config.py``), checked by the same owners. A value TOML cannot hold (a type, a
function, an ``exponential``) is written there in a text or table form, which the owner turns
into its Python value (``OptionGroup.from_config``); a function or type is named by its import
path, ``package.module:name`` (``import_ref``).
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from workers.settings import ConfigError

#: Raises ValueError naming the option when a value is bad; given every option of the group.
Check = Callable[[Mapping[str, Any]], object]
#: Turns an option's value as the config file holds it into its Python value (ValueError naming
#: the option when it cannot).
FromConfig = Callable[[Any], Any]


@dataclass(frozen=True)
class OptionGroup:
    """The stage options one owner reads: their names and defaults, and its check;
    ``from_config`` converts the options whose config-file form is not their Python value."""

    owner: str
    defaults: Mapping[str, Any]
    check: Check
    from_config: Mapping[str, FromConfig] = field(default_factory=dict)

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
            raise ConfigError(f"stage {label}: unknown option {name!r}{did_you_mean(name, known)}"
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


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """``, did you mean 'x'?`` for the closest of ``known``, or nothing."""
    close = difflib.get_close_matches(name, list(known), n=1)
    return f", did you mean {close[0]!r}?" if close else ""


def import_ref(ref: object, label: str, *, builtin: bool = False) -> Any:
    """The object an import path ``package.module:name`` names (``builtin``: a bare name is
    a builtin, ``ValueError``); ValueError naming the option ``label`` when it cannot."""
    module, sep, qualname = ref.partition(":") if isinstance(ref, str) else ("", "", "")
    if not sep and builtin and isinstance(ref, str):
        module, sep, qualname = "builtins", ":", ref
    if not (sep and module and qualname):
        raise ValueError(f"{label} must be an import path package.module:name, got {ref!r}")
    try:
        target: Any = importlib.import_module(module)
        for part in qualname.split("."):
            target = getattr(target, part)
    except Exception as exc:  # whatever the module raises while it is imported
        raise ValueError(f"{label} {ref!r} cannot be imported: {exc}") from None
    return target
