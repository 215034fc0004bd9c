"""Every benchmark command the docs show still parses: the flags exist, their values have the
expected types and choices, and ``one_config.py``'s ``<marker>`` overrides are ones it knows.

The numbers in docs/performance.md are only re-runnable while the commands above them are; a
renamed flag or renumbered choice (``--stage`` went from 0/1 to 1/2) would otherwise leave a
command that fails only when someone runs it for an hour. The history file keeps old commands on
purpose and is not checked.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

import pytest
from test_benchmark_scripts import benchmark_module  # tests/core is on sys.path (rootdir-less test folders)

ROOT = Path(__file__).resolve().parents[2]
DOCS = [p for p in sorted((ROOT / "docs").glob("*.md")) if p.name != "performance-history.md"]
SCRIPT = re.compile(r"^benchmarks/(\w+)\.py$")


def documented_commands(text: str) -> list[list[str]]:
    """The ``python benchmarks/X.py ...`` commands of fenced blocks (continuation lines joined)
    and of inline code spans, as argument lists from the script's path on; abridged ones (with
    ``...``) are left out."""
    lines: list[str] = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        lines += re.sub(r"\\\n\s*", " ", block).splitlines()
    lines += re.findall(r"`([^`\n]+)`", text)
    commands = []
    for line in lines:
        if "benchmarks/" not in line or "..." in line:
            continue
        tokens = shlex.split(line, comments=True)
        for i, token in enumerate(tokens[1:], start=1):
            if SCRIPT.match(token) and tokens[i - 1].endswith("python"):
                commands.append(tokens[i:])
                break
    return commands


CASES = [
    pytest.param(cmd, id=f"{doc.name}:{' '.join(cmd)[:70]}")
    for doc in DOCS
    for cmd in documented_commands(doc.read_text())
]


class Parsed(Exception):
    """Raised in place of running the script once its arguments parsed."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.namespace = args


def parse_only(command: list[str], monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    """Run ``command``'s ``main()`` up to its ``parse_args()`` and return what that parsed."""
    module = benchmark_module(SCRIPT.match(command[0]).group(1))  # type: ignore[union-attr]
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self: argparse.ArgumentParser, *a: object, **k: object) -> None:
        raise Parsed(original(self, *a, **k))  # type: ignore[arg-type]

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", command)
    with pytest.raises(Parsed) as parsed:
        module.main()
    return parsed.value.namespace


def test_the_docs_show_the_main_benchmark_commands() -> None:
    scripts = {SCRIPT.match(case.values[0][0]).group(1) for case in CASES}  # type: ignore[index, union-attr]
    assert {
        "step_time",
        "one_config",
        "optimisations",
        "profile_step",
        "memory",
        "data_loading",
        "inference",
    } <= scripts


@pytest.mark.parametrize("command", CASES)
def test_a_documented_benchmark_command_parses(command: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        args = parse_only(command, monkeypatch)
    except SystemExit as exc:  # argparse's way of rejecting a flag or a value
        pytest.fail(f"{' '.join(command)}: the script rejects its documented arguments (exit {exc.code})")
    if command[0] == "benchmarks/one_config.py":
        known = benchmark_module("one_config").MARKERS
        for config in args.config:
            markers = set(re.findall(r"<[^>]+>", config.split("=", 1)[1]))
            assert markers <= set(known), f"{config!r}: unknown marker(s) {markers - set(known)}"
