"""README's configuration table lists every FANOUT_* variable the code reads, and only those."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = ("workers", "producers", "demo_vendor", "examples")
VARIABLE = re.compile(r"\bFANOUT_[A-Z_]+[A-Z]\b")
#: Read by the test suite only, never by what a user runs: documented in tests/conftest.py.
TEST_ONLY = {
    "FANOUT_TEST_REDIS_URL": "the suite's Redis instead of a Valkey it starts",
    "FANOUT_TEST_POSTGRES_URL": "the suite's PostgreSQL",
    "FANOUT_REQUIRE_SERVICES": "CI: a test whose service is missing fails instead of skipping",
}


def read_by_the_code() -> set[str]:
    found: set[str] = set()
    for package in CODE:
        for path in (ROOT / package).rglob("*.py"):
            found.update(VARIABLE.findall(path.read_text()))
    return found - set(TEST_ONLY)


def in_the_table() -> set[str]:
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(FANOUT_[A-Z_]+)` \|", table, re.MULTILINE))


def test_the_table_lists_every_variable_the_code_reads() -> None:
    code = read_by_the_code()
    assert "FANOUT_REDIS_URL" in code and "FANOUT_LIMIT_LEASE_S" in code  # the scan works
    assert sorted(code - in_the_table()) == []


def test_the_table_lists_no_variable_the_code_does_not_read() -> None:
    assert sorted(in_the_table() - read_by_the_code()) == []
