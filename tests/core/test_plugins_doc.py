"""docs/plugins.md's complete third-party package works as shown.

The test takes the doc's three code blocks (named by their first-line comment), installs the
package the way pip would leave it (the module plus a ``dist-info`` with the entry points of the
``pyproject.toml`` block), and runs the experiment block.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def named_blocks(text: str) -> dict[str, str]:
    """Fenced code blocks whose first line is a comment naming a file: that name -> the block."""
    blocks = {}
    for body in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        first, _, rest = body.partition("\n")
        if first.startswith("# ") and "." in first:
            blocks[first[2:].strip()] = rest
    return blocks


def test_the_documented_package_registers_its_names_and_trains(tmp_path, run_cli):
    blocks = named_blocks((ROOT / "docs" / "plugins.md").read_text())
    assert {"pyproject.toml", "my_package/plugin.py", "experiment.toml"} <= set(blocks)
    project = tomllib.loads(blocks["pyproject.toml"])["project"]
    site = tmp_path / "site"
    (site / "my_package").mkdir(parents=True)
    (site / "my_package" / "__init__.py").write_text("")
    (site / "my_package" / "plugin.py").write_text(blocks["my_package/plugin.py"])
    dist = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
    )
    entry_points = project["entry-points"]["branchadapt"]
    (dist / "entry_points.txt").write_text(
        "[branchadapt]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    )
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH", "")]))}

    listed = run_cli("plugins", env=env)
    assert listed.returncode == 0, listed.stderr
    origin = f"{project['name']} {project['version']}"
    for name in ("two_layer", "margin"):
        assert any(name in line and origin in line for line in listed.stdout.splitlines()), name

    exp = tmp_path / "experiment.toml"
    exp.write_text(blocks["experiment.toml"])
    done = run_cli(
        "run", str(exp), "--run-dir", str(tmp_path / "run"), "--set", 'train.progress="plain"', env=env
    )
    assert done.returncode == 0, done.stderr
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    margins = [m["loss/margin"] for m in metrics if "loss/margin" in m]
    assert margins and all(v >= 0 for v in margins)
    assert {m.get("stage") for m in metrics} >= {"basic", "transfer"}
    # the example learns: both groups' held-out accuracy well above the 1/3 of chance
    scores = json.loads((tmp_path / "run" / "eval" / "transfer-test" / "metrics.json").read_text())
    assert {g: s["accuracy"] > 0.8 for g, s in scores["groups"].items()} == {"a": True, "b": True}, scores
