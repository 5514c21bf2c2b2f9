"""Flower in a real browser: headless Chromium (Debian's ``chromium``, driven by Playwright
through ``executable_path``: no browser download) opens `fanout flower` after a demo run on
real workers where two metric-days fail, logs in with basic auth, and reads the tasks page:
every task of the run by name, with SUCCESS and FAILURE.

The screenshot goes to the test's temporary directory; with ``FANOUT_FLOWER_SCREENSHOT=PATH``
also to PATH (``docs/flower.png`` was made so)."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
import test_flower
from conftest import VendorHandle, WorkerFactory, require_service, wait_for
from test_flower import AUTH, FlowerFactory, flower_tasks
from test_harvest import END_DAY, finish, run_demo

start_flower = test_flower.start_flower  # the fixture: `fanout flower` on a free port

#: Two metric-days the vendor does not know: a 404 fails them at once.
MISSING = [f"/accounts/acct-002/services/svc-00{n}/metrics?day={END_DAY}" for n in (1, 3)]


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        require_service("chromium (Debian's package) is not installed")
    return path


def test_flower_in_a_browser_shows_the_runs_tasks_by_name_and_state(
    vendor: VendorHandle, start_worker: WorkerFactory, start_flower: FlowerFactory,
    tmp_path: Path,
) -> None:
    executable = chromium()
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        require_service("playwright is not installed (the dev extras)")
    flower = start_flower()
    start_worker(concurrency=4, ready=True)
    vendor.configure(accounts=2, services=3, not_found_paths=MISSING)
    run_id = run_demo(vendor, days=4)
    summary = finish(run_id)
    assert summary["status"] == "partial"
    assert summary["stages"]["metric_day"]["failed"] == 2
    wait_for(lambda: len(flower_tasks(flower, {run_id})) == 2 + 6 + 24, timeout_s=30,
             what="every item in Flower")

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        try:
            with pytest.raises(Error, match="ERR_INVALID_AUTH_CREDENTIALS"):
                browser.new_page().goto(f"{flower}/tasks")  # no login: Flower says 401

            user, password = AUTH
            context = browser.new_context(http_credentials={"username": user,
                                                            "password": password},
                                          viewport={"width": 1440, "height": 900})
            page = context.new_page()
            answer = page.goto(f"{flower}/tasks")
            assert answer is not None and answer.status == 200
            page.select_option("#tasks-table_length select", "50")
            info = page.locator("#tasks-table_info")
            info.filter(has_text="Showing 1 to 32 of 32 tasks").wait_for(timeout=30_000)
            rows = page.locator("#tasks-table tbody tr").all_inner_texts()
            shot = tmp_path / "flower.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()

    assert len(rows) == 32
    assert all(run_id in row for row in rows)
    names = Counter(next(n for n in ("demo.accounts", "demo.services", "demo.metric_day")
                         if n in row) for row in rows)
    assert names == {"demo.accounts": 2, "demo.services": 6, "demo.metric_day": 24}
    states = Counter("FAILURE" if "FAILURE" in row else "SUCCESS" if "SUCCESS" in row
                     else row for row in rows)
    assert states == {"SUCCESS": 30, "FAILURE": 2}
    failed = [row for row in rows if "FAILURE" in row]
    assert all("demo.metric_day" in row for row in failed)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    keep = os.environ.get("FANOUT_FLOWER_SCREENSHOT")
    if keep:
        shutil.copyfile(shot, keep)


@pytest.fixture(autouse=True)
def _no_proxy_for_the_browser(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chromium must reach Flower on 127.0.0.1 directly, whatever proxy the machine sets."""
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
