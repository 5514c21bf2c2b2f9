"""An MkDocs hook: the pages that are made from the code at build time, so they cannot drift.

A page asks for a generated part with a marker on a line of its own, ``<!-- fanout:NAME -->``:

- ``cli``: every command of ``producers.cli.build_parser()`` (walked, subcommands included),
  with its usage, arguments, help texts, defaults and choices;
- ``settings``: the README's Configuration section (its table lists every ``FANOUT_*``
  variable; ``tests/test_readme_settings.py`` holds the table to the code);
- ``benchmarks``: each suite's figures from the latest ``benchmarks/results/*.json``
  that ran it.

An unknown marker fails the build.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # the project, even when it is not installed
    sys.path.insert(0, str(ROOT))

MARKER = re.compile(r"^<!-- fanout:(\w+) -->$", re.MULTILINE)
#: Wide enough that a usage line wraps rarely, narrow enough for a code block.
USAGE_WIDTH = 76


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    def generate(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in GENERATORS:
            raise PluginError(f"{page.file.src_uri}: unknown generated part {name!r} "
                              f"(known: {', '.join(sorted(GENERATORS))})")
        return GENERATORS[name]()

    return MARKER.sub(generate, markdown)


# -- the command line -------------------------------------------------------------------


def _forwarded() -> dict[str, Callable[[], argparse.ArgumentParser]]:
    """Commands that hand their options to another parser untouched (``fanout vendor serve``
    runs the demo vendor's): the page shows that parser's options."""

    def vendor_serve() -> argparse.ArgumentParser:
        from demo_vendor.__main__ import build_parser as vendor_parser

        return _subcommands(vendor_parser())["serve"][0]

    return {"fanout vendor serve": vendor_serve}


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, tuple[argparse.ArgumentParser,
                                                                     str]]:
    """A parser's subcommands, each once (an alias is the same parser): name -> (parser,
    its one-line help)."""
    found: dict[str, tuple[argparse.ArgumentParser, str]] = {}
    seen: set[int] = set()
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
        for name, sub in action.choices.items():
            if id(sub) not in seen:
                seen.add(id(sub))
                found[name] = (sub, helps.get(name, ""))
    return found


def walk_commands(parser: argparse.ArgumentParser, path: str = "fanout", summary: str = "",
                  ) -> Iterator[tuple[str, argparse.ArgumentParser, str]]:
    """Every command under ``parser``, depth first: (``fanout cache clear``, its parser, its
    one-line help). A forwarding command yields the parser it forwards to."""
    forwarded = _forwarded()
    if path in forwarded:
        parser = forwarded[path]()
    yield path, parser, summary
    for name, (sub, help_text) in _subcommands(parser).items():
        yield from walk_commands(sub, f"{path} {name}", help_text)


def anchor(path: str) -> str:
    return path.replace(" ", "-")


def _code_spans(text: str) -> str:
    """HTML-escaped text with its `code` spans as <code>."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{part}</code>" if i % 2 else part for i, part in enumerate(parts))


def _default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    default = action.default
    if isinstance(action, argparse._StoreTrueAction) and default is False:
        return "off"
    if default is None or default == argparse.SUPPRESS or default == []:
        return ""
    return f"<code>{html.escape(str(default))}</code>"


def _formatter(parser: argparse.ArgumentParser, path: str) -> argparse.HelpFormatter:
    """The parser's own help formatter (a custom one may not take a width)."""
    try:
        return parser.formatter_class(prog=path, width=USAGE_WIDTH)
    except TypeError:
        return parser.formatter_class(prog=path)


def _argument_rows(parser: argparse.ArgumentParser, path: str) -> list[str]:
    formatter = _formatter(parser, path)
    rows = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        if action.help == argparse.SUPPRESS:
            continue
        invocation = formatter._format_action_invocation(action)
        help_text = formatter._expand_help(action) if action.help else ""
        if action.choices is not None and not isinstance(action.choices, dict):
            choices = ", ".join(str(c) for c in action.choices)
            help_text = f"{help_text} (one of: {choices})" if help_text else f"one of: {choices}"
        rows.append(
            f"<tr><td><code>{html.escape(invocation)}</code></td>"
            f"<td>{_code_spans(help_text)}</td><td>{_default(action)}</td></tr>"
        )
    return rows


def _usage(parser: argparse.ArgumentParser, path: str) -> str:
    formatter = _formatter(parser, path)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups,
                        prefix="")
    return formatter.format_help().strip()


def cli_reference() -> str:
    from producers.cli import build_parser

    out = []
    for path, parser, summary in walk_commands(build_parser()):
        depth = path.count(" ")
        if depth:
            out.append(f"{'#' * (depth + 1)} {path} {{#{anchor(path)}}}\n")
        if summary:
            out.append(f"{summary[0].upper()}{summary[1:]}.\n")
        if parser.description and parser.description != summary:
            out.append(f"{parser.description}\n")
        out.append(f"```text\n{_usage(parser, path)}\n```\n")
        commands = _subcommands(parser)
        if commands:
            links = ", ".join(f"[`{name}`](#{anchor(f'{path} {name}')})" for name in commands)
            out.append(f"Commands: {links}.\n")
        rows = _argument_rows(parser, path)
        if rows:
            out.append('<table>\n<thead><tr><th>argument</th>'
                       "<th>what it does</th><th>default</th></tr></thead>\n<tbody>\n"
                       + "\n".join(rows) + "\n</tbody>\n</table>\n")
    return "\n".join(out)


# -- settings ---------------------------------------------------------------------------


def settings_reference() -> str:
    """The README's Configuration section, as it stands (its heading dropped)."""
    readme = (ROOT / "README.md").read_text()
    try:
        section = readme.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    except IndexError:
        raise PluginError("README.md has no '## Configuration' section") from None
    return section.strip() + "\n"


# -- benchmarks -------------------------------------------------------------------------

RESULTS = ROOT / "benchmarks" / "results"


def latest_suites() -> dict[str, tuple[Path, dict[str, Any]]]:
    """Each suite's latest successful run: its name -> (its results file, the suite). The
    files are named by their UTC start, so the last one that ran a suite is its latest."""
    files = sorted(RESULTS.glob("*.json"))
    if not files:
        raise PluginError(f"no benchmark results in {RESULTS}")
    found: dict[str, tuple[Path, dict[str, Any]]] = {}
    for path in files:
        for name, suite in json.loads(path.read_text()).get("suites", {}).items():
            if suite.get("status") == "ok":
                found[name] = (path, suite)
    return found


def _number(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".") if abs(value) < 10 else f"{value:,.1f}"
    return html.escape(str(value))


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "&#124;") for cell in row) + " |"
              for row in rows]
    return "\n".join(lines) + "\n"


def _flat(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Scalar figures as (dotted.name, value); lists of runs are left out (medians are in)."""
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _flat(inner, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list):
        if value and all(not isinstance(v, dict | list) for v in value):
            yield prefix, ", ".join(_number(v) for v in value)
    else:
        yield prefix, value


def _harvest(suite: dict[str, Any]) -> str:
    figures, settings = suite["figures"], suite["settings"]
    contenders: dict[str, Any] = settings.get("contenders", {})
    names = list(figures.get("metric_days_per_s", {}))
    columns = [
        ("metric-days/s", "metric_days_per_s"),
        ("leaf phase /s", "leaf_phase_per_s"),
        ("worker CPU ms per leaf", "worker_cpu_ms_per_metric_day"),
        ("Redis CPU ms per leaf", "redis_cpu_ms_per_metric_day"),
        ("worker RSS MB", "worker_rss_bytes"),
    ]
    ratios = figures.get("ratios", {})
    rows = []
    for name in names:
        against = contenders.get(name, {}).get("ratio_against", "fanout")
        ratio = ratios.get(f"{against}/{name}")
        about = contenders.get(name, {})
        row = [f"`{name}`", html.escape(about.get("workers", "")),
               html.escape(about.get("leaf_work", ""))]
        for _, key in columns:
            value = figures.get(key, {}).get(name)
            if key == "worker_rss_bytes" and value is not None:
                value = round(value / 2**20)
            row.append("" if value is None else _number(value))
        row.append("" if ratio is None else f"{ratio:.2f}x")
        rows.append(row)
    shape = settings.get("shape", {})
    text = (
        f"{shape.get('total', 0):,} metric-days ({shape.get('accounts')} accounts x "
        f"{shape.get('services')} services x {shape.get('days')} days) at "
        f"{settings.get('latency_ms')} ms vendor latency ({settings.get('regime')} regime), "
        "each contender on the worker settings its sweep chose, medians of "
        f"{settings.get('repeats')} rounds. The leaf phase is the rate from 20% to 80% of the "
        "leaves done; \"ratio\" is the first contender of the pair over this one "
        "(`fanout/celery`).\n\n"
    )
    ceilings = {k: v for k, v in figures.get("in_flight_ceiling_per_s", {}).items() if v}
    if ceilings:
        text += ("Ceilings at this latency (calls in flight / latency), calls/s: "
                 + ", ".join(f"`{k}` {_number(v)}" for k, v in ceilings.items()) + ".\n\n")
    header = ["contender", "workers", "leaf work", *(label for label, _ in columns), "ratio"]
    return text + _table(header, rows)


def _generic(suite: dict[str, Any]) -> str:
    rows = [[f"`{name}`", _number(value)] for name, value in _flat(suite["figures"])]
    return _table(["figure", "value"], rows) if rows else "No figures.\n"


def _about(path: Path) -> str:
    """When, where and on what a results file was measured."""
    document = json.loads(path.read_text())
    machine, code = document.get("machine", {}), document.get("code", {})
    versions = ", ".join(f"{k} {v}" for k, v in document.get("versions", {}).items())
    start_load = (machine.get("loadavg_at_start") or ["?"])[0]
    end_load = (machine.get("loadavg_at_end") or ["?"])[0]
    changed = " (files changed while it ran)" if code.get("changed_during_run") else ""
    return (
        f"- `benchmarks/results/{path.name}`: started {document.get('started_at', '?')}, "
        f"{document.get('wall_s', 0):,.0f} s, commit "
        f"`{str(code.get('at_start', {}).get('commit', '?'))[:10]}`{changed}, "
        f"{machine.get('cpu_count')} cores, load average {_number(start_load)} at the start "
        f"and {_number(end_load)} at the end; {versions}.\n"
    )


def benchmarks_reference() -> str:
    suites = latest_suites()
    files = sorted({path for path, _ in suites.values()})
    out = ["Each suite's figures come from the latest results file in which it ran:\n",
           "".join(_about(path) for path in files)]
    for name, (path, suite) in suites.items():
        before = (suite.get("loadavg_before") or ["?"])[0]
        after = (suite.get("loadavg_after") or ["?"])[0]
        out.append(f"## {name}\n")
        out.append(f"From `benchmarks/results/{path.name}`; load average {_number(before)} "
                   f"before the suite, {_number(after)} after.\n")
        out.append(_harvest(suite) if name == "harvest" else _generic(suite))
    return "\n".join(out)


GENERATORS: dict[str, Callable[[], str]] = {
    "cli": cli_reference,
    "settings": settings_reference,
    "benchmarks": benchmarks_reference,
}
