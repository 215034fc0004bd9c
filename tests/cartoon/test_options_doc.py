"""docs/cartoon.md's options reference is `branchadapt plugins NAME --markdown` for each
component it lists: an option added, removed, re-described or given another default fails here
until the section is printed again."""

from __future__ import annotations

import re
from pathlib import Path

from branchadapt.optionsdoc import entries_named, markdown
from branchadapt.plugins import default_plugins

DOC = Path(__file__).resolve().parents[2] / "docs" / "cartoon.md"


def test_the_options_reference_is_what_the_command_prints():
    text = DOC.read_text()
    section = text[text.index("\n## Options reference\n") :]
    listed = re.findall(r"^### (\w+)$", section, re.M)
    assert {"ugatit", "translate", "faces", "selective_detach", "adversarial", "face_id"} <= set(listed)
    registry = default_plugins().registry
    for name in listed:
        body = section.split(f"\n### {name}\n\n", 1)[1].split("\n### ", 1)[0].strip()
        expected = "\n\n".join(markdown(e) for e in entries_named(registry, name))
        assert body == expected, f"regenerate with: branchadapt plugins {name} --markdown"
