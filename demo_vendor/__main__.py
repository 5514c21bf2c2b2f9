"""CLI: ``python -m demo_vendor serve [options]``.

``main(argv)`` returns an exit code instead of exiting so the project CLI
(``fanout vendor serve ...``) can delegate to it with the same options.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from .app import SERVERS, serve
from .config import ConfigError, VendorConfig

PROG = "demo_vendor"


class UsageError(Exception):
    """Bad command line; reported as a single stderr line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    # argparse would print multi-line usage and sys.exit(2); we want one
    # line and a return code, so raise instead.
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    defaults = VendorConfig()
    parser = _Parser(prog=PROG, description="Bundled demo vendor API.", allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    s = commands.add_parser("serve", help="run the HTTP server", allow_abbrev=False)
    s.add_argument("--host", default="127.0.0.1",
                   help="the address to listen on (default: %(default)s)")
    s.add_argument("--port", type=int, default=8765,
                   help="the port to listen on; 0 picks a free one (default: %(default)s)")
    s.add_argument("--ready-file", type=Path,
                   help="write the base URL here once listening (default: none)")
    s.add_argument(
        "--server",
        choices=SERVERS,
        default=SERVERS[0],
        help="HTTP layer: the builtin asyncio server (less CPU per request) or aiohttp "
        "(default: %(default)s)",
    )
    s.add_argument("--accounts", type=int, default=defaults.accounts,
                   help="accounts served (default: %(default)s)")
    s.add_argument("--services", type=int, default=defaults.services,
                   help="services per account (default: %(default)s)")
    s.add_argument("--page-size", type=int, default=defaults.page_size,
                   help="services per page of an account's list (default: %(default)s)")
    s.add_argument("--seed", type=int, default=defaults.seed,
                   help="seed of the data and of which requests fail (default: %(default)s)")
    s.add_argument("--latency-ms", type=float, default=defaults.latency_ms,
                   help="added latency per request, in ms (default: %(default)s)")
    s.add_argument("--error-rate", type=float, default=defaults.error_rate,
                   help="share of request keys answered 500, 0 to 1 (default: %(default)s)")
    s.add_argument("--error-times", type=int, default=defaults.error_times,
                   help="how often each such key fails before it answers; 0: always "
                        "(default: %(default)s)")
    s.add_argument("--rate-limit-rps", type=float, default=defaults.rate_limit_rps,
                   help="requests per second before 429s; 0: no limit (default: "
                        "%(default)s)")
    s.add_argument("--key-rate-limit-rps", type=float, default=defaults.key_rate_limit_rps,
                   help="requests per second per API key (the Authorization: Bearer token) "
                        "before 429s; 0: no limit (default: %(default)s)")
    s.add_argument(
        "--rate-limit-headers",
        action="store_true",
        help="announce the limits: RateLimit-Limit/-Remaining/-Reset and "
        "X-RateLimit-Remaining/-Reset on every answer (default: only 429 + Retry-After)",
    )
    s.add_argument(
        "--account-tokens",
        action="store_true",
        help="give each account of the listing its API token, tok-<account id>",
    )
    s.add_argument(
        "--retry-after-integer",
        action="store_true",
        help="send Retry-After as whole seconds (rounded up) instead of decimals",
    )
    s.add_argument("--stall-rate", type=float, default=defaults.stall_rate,
                   help="share of request keys that stall --stall-ms before answering, 0 to "
                        "1 (default: %(default)s)")
    s.add_argument("--stall-ms", type=float, default=defaults.stall_ms,
                   help="how long a stalled request waits, in ms (default: %(default)s)")
    s.add_argument(
        "--stall-path",
        action="append",
        default=[],
        metavar="KEY",
        help="always stall this request key (path, plus ?day=... for metrics); repeatable "
        "(default: none)",
    )
    s.add_argument(
        "--not-found-path",
        action="append",
        default=[],
        metavar="KEY",
        help="answer this request key with 404 until reconfigured; repeatable (default: "
        "none)",
    )
    s.add_argument(
        "--burst-429",
        type=int,
        default=0,
        metavar="N",
        help="answer the first N requests with 429 + Retry-After (default: %(default)s)",
    )
    s.add_argument(
        "--burst-retry-after",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="the Retry-After of --burst-429's responses (default: %(default)s)",
    )
    s.add_argument(
        "--burst-key",
        metavar="TOKEN",
        help="--burst-429 answers only this API key's requests (default: any)",
    )
    s.add_argument("--report-polls", type=int, default=defaults.report_polls,
                   help="polls before an async report is ready (default: %(default)s)")
    s.add_argument("--metrics", default=",".join(defaults.metrics),
                   help="the metric names services get, comma-separated (default: "
                        "%(default)s)")
    return parser


def config_from_args(args: argparse.Namespace) -> VendorConfig:
    """Build a VendorConfig; ConfigError on out-of-range values."""
    config = VendorConfig()
    config.update(
        {
            "accounts": args.accounts,
            "services": args.services,
            "page_size": args.page_size,
            "seed": args.seed,
            "metrics": args.metrics,
            "latency_ms": args.latency_ms,
            "error_rate": args.error_rate,
            "error_times": args.error_times,
            "rate_limit_rps": args.rate_limit_rps,
            "key_rate_limit_rps": args.key_rate_limit_rps,
            "rate_limit_headers": args.rate_limit_headers,
            "account_tokens": args.account_tokens,
            "retry_after_integer": args.retry_after_integer,
            "stall_rate": args.stall_rate,
            "stall_ms": args.stall_ms,
            "stall_paths": args.stall_path,
            "report_polls": args.report_polls,
            "not_found_paths": args.not_found_path,
            "burst_429": {
                "count": args.burst_429, "retry_after_s": args.burst_retry_after,
                **({"key": args.burst_key} if args.burst_key is not None else {}),
            },
        }
    )
    return config


def _write_ready_file(path: Path, url: str) -> None:
    # Write-then-rename so a watcher never reads a half-written URL.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(url)
    os.replace(tmp, path)


async def _run(args: argparse.Namespace, config: VendorConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # Not possible off the main thread or on Windows; Ctrl-C then falls
        # back to KeyboardInterrupt, handled in main().
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)

    def ready(url: str) -> None:
        if args.ready_file is not None:
            _write_ready_file(args.ready_file, url)
        print(f"demo vendor listening on {url}", flush=True)

    await serve(config, args.host, args.port, stop=stop, on_ready=ready, server=args.server)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command != "serve":
            raise UsageError("expected a command: serve")
        if not 0 <= args.port <= 65535:
            raise UsageError("--port must be between 0 and 65535")
        config = config_from_args(args)
    except (UsageError, ConfigError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    try:
        asyncio.run(_run(args, config))
    except KeyboardInterrupt:
        pass
    except OSError as exc:  # e.g. port already in use
        print(f"{PROG}: error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
