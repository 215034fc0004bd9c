"""docs/config.md's tables of the `train` and optimiser keys list every key of the schema, each
with the default the schema has: a key added, renamed or given another default fails here."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from branchadapt.config import OptimSpec, ScheduleSpec, TrainSpec

DOC = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def table_after(heading: str) -> dict[str, object]:
    """``{key: default}`` of the first table under ``heading``, defaults read as TOML values."""
    text = DOC.read_text()
    section = text[text.index(f"\n{heading}\n") + len(heading) + 2 :].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([\w.]+)` \| `([^`]+)` \|", section, re.M)
    return {key: tomllib.loads(f"v = {default}")["v"] for key, default in rows}


def expected(model: type, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for name, field in model.model_fields.items():
        if field.default_factory is ScheduleSpec:
            out.update(expected(ScheduleSpec, f"{name}."))
            continue
        value = field.get_default(call_default_factory=True)
        out[prefix + name] = list(value) if isinstance(value, tuple) else value
    return out


@pytest.mark.parametrize(("heading", "model"), [("## train", TrainSpec), ("## Optimisers", OptimSpec)])
def test_the_documented_keys_and_defaults_are_the_schema_s(heading, model):
    documented = table_after(heading)
    assert documented == expected(model)
