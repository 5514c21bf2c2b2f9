"""``celery -A workers worker`` (and ``celery -A workers flower``) find the app here.

A bad setting is one line on stderr and exit code 2, as from ``fanout``: Celery would print
the ConfigError's traceback while importing this module."""

import sys

from workers.app import create_app
from workers.settings import ConfigError

try:
    app = create_app()
except ConfigError as exc:
    print(f"fanout: error: {exc}", file=sys.stderr)
    raise SystemExit(2) from None
