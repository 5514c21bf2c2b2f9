"""``fanout --help`` and every ``fanout X --help`` are honest: the whole argparse tree (the
``build_parser`` the docs' CLI reference is generated from, and the demo vendor's, which
``fanout vendor serve --help`` shows) has a text for every command, option and positional,
and each option that takes a value names its default."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from demo_vendor.__main__ import build_parser as vendor_parser
from producers.cli import build_parser

Tree = Iterator[tuple[str, argparse.ArgumentParser]]


def walk(parser: argparse.ArgumentParser, path: str) -> Tree:
    """Every parser under ``parser`` (itself first), by its command line."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                assert helps.get(name), f"`{path} {name}` has no help text"
                yield from walk(sub, f"{path} {name}")


def trees() -> Tree:
    yield from walk(build_parser(), "fanout")
    yield from walk(vendor_parser(), "fanout vendor")


def problems(path: str, parser: argparse.ArgumentParser) -> list[str]:
    found = []
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        if not action.help or action.help == argparse.SUPPRESS:
            found.append(f"{path} {name}: no help text")
            continue
        text = formatter._expand_help(action)
        takes_value = action.nargs != 0
        optional = bool(action.option_strings) or action.nargs in ("?", "*")
        if takes_value and optional and "default" not in text:
            found.append(f"{path} {name}: no default named in {text!r}")
        default = action.default
        if default not in (None, False, [], argparse.SUPPRESS) and str(default) not in text:
            found.append(f"{path} {name}: default {default!r} not named in {text!r}")
    return found


def test_every_command_option_and_positional_has_help_and_its_default() -> None:
    found = [problem for path, parser in trees() for problem in problems(path, parser)]
    assert found == []


def test_the_walk_sees_the_nested_commands() -> None:
    paths = {path for path, _ in trees()}
    assert {"fanout limits set", "fanout schedules run", "fanout cache clear",
            "fanout vendor serve", "fanout run", "fanout pipelines"} <= paths
    assert len(paths) >= 25


def test_the_check_fails_on_a_bare_option() -> None:
    parser = argparse.ArgumentParser(prog="x")
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--timeout", type=float, default=None, help="seconds to wait")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--port", type=int, default=5555, help="port (default: 80)")
    assert problems("x", parser) == [
        "x --days: no help text",
        "x --timeout: no default named in 'seconds to wait'",
        "x --json: no help text",
        "x --port: default 5555 not named in 'port (default: 80)'",
    ]


@pytest.mark.parametrize("command", [[], ["run"], ["status"], ["cache", "clear"],
                                     ["limits", "set"], ["schedules", "run"], ["vendor", "serve"]])
def test_help_is_printed_and_exits_0(command: list[str]) -> None:
    shown = subprocess.run([sys.executable, "-m", "producers.cli", *command, "--help"],
                           capture_output=True, text=True, timeout=60, env=os.environ.copy())
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("usage: ")
    assert shown.stderr == ""


def test_help_tells_the_truths_the_issue_asked_for() -> None:
    parser = build_parser()
    texts = {path: parser_.format_help() for path, parser_ in walk(parser, "fanout")}
    assert "(default: a table of the 20 most recent runs; with --watch, the latest run)" \
        in " ".join(texts["fanout status"].split())
    clear = " ".join(texts["fanout cache clear"].split())
    assert "PIPELINE[.STAGE]" in clear and "a pipeline (all its stages) or one stage" in clear
    run = " ".join(texts["fanout run"].split())
    assert "--items FILE" in run and "--root-stage STAGE" in run
