"""Root items given as data (``fanout run --items FILE|-``, a schedule's ``items_file``): one
JSON array, or JSON lines (one JSON value per line; blank lines are skipped). A text that is
one JSON value but not an array is one item."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, TextIO

from workers.settings import ConfigError

STDIN = "-"


def read_items(source: str, *, label: str = "--items", stdin: TextIO | None = None) -> list[Any]:
    """The items of the file ``source`` (``-``: standard input). A missing or unreadable
    file, text that is not JSON, or no items at all is a ConfigError of one line naming
    ``label`` and the file."""
    where = "stdin" if source == STDIN else source
    try:
        if source == STDIN:
            text = (stdin or sys.stdin).read()
        else:
            text = Path(source).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{label}: no such file {source!r}") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"{label}: cannot read {where!r}: {reason}") from None
    return parse_items(text, f"{label} {where}")


def parse_items(text: str, where: str) -> list[Any]:
    """A JSON array's elements, or one item per JSON line (see the module's doc)."""
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        items = _json_lines(text, where)
    else:
        items = whole if isinstance(whole, list) else [whole]
    if not items:
        raise ConfigError(f"{where}: no items (give a JSON array, or one JSON value per line)")
    return items


def _json_lines(text: str, where: str) -> list[Any]:
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: line {number} is not JSON ({exc.msg}, column "
                              f"{exc.colno}); give a JSON array, or one JSON value per "
                              "line") from None
    return items
