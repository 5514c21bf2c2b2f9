"""The stage options of input caching (``engine/cache_hook.py`` reads them): ``cache="inputs"``
or a ``cache_key=fn(ctx, item)``, kept ``cache_ttl_s`` (default a day)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from workers.options import OptionGroup, import_ref

DEFAULT_TTL_S = 86_400.0


def check(options: Mapping[str, Any]) -> None:
    cache, key_fn, ttl_s = options["cache"], options["cache_key"], options["cache_ttl_s"]
    if cache not in (None, "inputs"):
        raise ValueError(f"cache must be 'inputs', got {cache!r}")
    if key_fn is not None and not callable(key_fn):
        raise ValueError(f"cache_key must be a callable (ctx, item) -> str, got {key_fn!r}")
    number = isinstance(ttl_s, int | float) and not isinstance(ttl_s, bool)
    if not (number and math.isfinite(ttl_s) and ttl_s > 0):
        raise ValueError(f"cache_ttl_s must be > 0 seconds, got {ttl_s!r}")


OPTIONS = OptionGroup(
    "cache", {"cache": None, "cache_key": None, "cache_ttl_s": DEFAULT_TTL_S}, check,
    # In the config file a key function is named by its import path, package.module:name.
    from_config={"cache_key": lambda ref: import_ref(ref, "cache_key")},
)
