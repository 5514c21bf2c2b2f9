"""The stage option of global limits (``engine/limit_hook.py`` reads it): ``limits=[NAME,
per_key(NAME, key_of), ...]``, the limits (``fanout limits set``) each item of the stage goes
through, in order; a ``per_key`` one through the key ``key_of(item)`` of the limit."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from workers.limits import PerKey
from workers.options import OptionGroup


def check(options: Mapping[str, Any]) -> None:
    names = options["limits"]
    # A bare string would be read as one limit per letter.
    if not (isinstance(names, list | tuple)
            and all((isinstance(n, str) and n) or isinstance(n, PerKey) for n in names)):
        raise ValueError(f"limits must be a list of limit names, got {names!r}")


OPTIONS = OptionGroup("limits", {"limits": ()}, check)
