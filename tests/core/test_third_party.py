"""A third-party package, made inside the test, extends branchadapt with no core edit.

The package has its own distribution metadata and ``branchadapt`` entry point; it registers a
new Backbone and a new LossTerm, and an experiment file uses both.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

PACKAGE = '''
"""A third-party branchadapt plugin."""
import torch
from torch import nn
import branchadapt as ba
from pydantic import Field


class WideOptions(ba.PluginOptions):
    in_features: int = 6
    width: int = Field(12, ge=1)
    out_features: int = 3


class Wide(ba.Backbone):
    """Two-layer net from a third-party package."""
    Options = WideOptions

    def __init__(self, options=None):
        super().__init__(options)
        self.enc = nn.Linear(self.options.in_features, self.options.width)
        self.dec = nn.Linear(self.options.width, self.options.out_features)

    def stage_names(self):
        return ["enc", "dec"]

    def forward(self, x):
        return self.dec(torch.tanh(self.enc(x)))


class LogitPenaltyOptions(ba.LossOptions):
    power: int = 2


class LogitPenalty(ba.LossTerm):
    """Penalises large logits (third-party loss)."""
    Options = LogitPenaltyOptions

    def forward(self, outputs, batch):
        return outputs["logits"].abs().pow(self.options.power).mean()


@ba.hookimpl
def register_backbones(register):
    register(Wide, name="thirdparty_wide")


@ba.hookimpl
def register_losses(register):
    register(LogitPenalty, name="logit_penalty")
'''

EXPERIMENT = """
name = "third"
groups = ["a", "b"]
[data]
type = "clusters"
features = 6
classes = 3
counts = { a = 32, b = 8 }
[task]
type = "supervised"
[model]
type = "thirdparty_wide"
width = 10
[losses.cross_entropy]
[losses.logit_penalty]
weight = 0.01
power = 2
[train]
progress = "plain"
log_every = 1
[stages.basic]
steps = 2
groups = ["a"]
[stages.transfer]
steps = 2
init_from = "basic"
splitter = { type = "branches", low = 1, top = 0 }
"""


@pytest.fixture
def third_party(tmp_path: Path) -> dict[str, str]:
    site = tmp_path / "site"
    pkg = site / "ba_thirdparty"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(PACKAGE)
    dist = site / "ba_thirdparty-0.3.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ba-thirdparty\nVersion: 0.3.1\n")
    (dist / "entry_points.txt").write_text("[branchadapt]\nthirdparty = ba_thirdparty\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH", "")]))
    return env


def test_plugins_command_lists_third_party_names_with_version(third_party, run_cli):
    out = run_cli("plugins", env=third_party)
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if "thirdparty_wide" in line or "logit_penalty" in line]
    assert len(rows) == 2
    assert all("ba-thirdparty 0.3.1" in row for row in rows)
    assert any("backbone" in row for row in rows) and any("loss" in row for row in rows)


def test_experiment_uses_third_party_backbone_and_loss(third_party, run_cli, tmp_path):
    exp = tmp_path / "third.toml"
    exp.write_text(EXPERIMENT)
    out = run_cli("run", str(exp), "--run-dir", str(tmp_path / "run"), env=third_party)
    assert out.returncode == 0, out.stderr
    assert "loss/logit_penalty" in (tmp_path / "run" / "metrics.jsonl").read_text()
    bad = run_cli("validate", str(exp), "--set", "losses.logit_penalty.power=x", env=third_party)
    assert bad.returncode == 2
    assert "losses.logit_penalty.power: expected an integer, not a string (got 'x')" in bad.stderr
    # without the package installed, the names are unknown and the error says so
    missing = run_cli("validate", str(exp))
    assert missing.returncode == 2
    assert "model.type: unknown backbone 'thirdparty_wide'" in missing.stderr


def test_local_plugin_module_from_experiment_file(tmp_path, run_cli):
    (tmp_path / "my_local_plugin.py").write_text(PACKAGE)
    exp = tmp_path / "local.toml"
    exp.write_text('plugins = ["my_local_plugin"]\n' + EXPERIMENT)
    out = run_cli("run", str(exp), "--run-dir", str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr
    exp.write_text('plugins = ["not_a_module_anywhere"]\n' + EXPERIMENT)
    out = run_cli("validate", str(exp))
    assert out.returncode == 2 and "plugin module 'not_a_module_anywhere' not found" in out.stderr
    exp.write_text('plugins = ["../my_local_plugin"]\n' + EXPERIMENT)  # a path, not a module name
    out = run_cli("validate", str(exp))
    assert out.returncode == 2 and "plugins: '../my_local_plugin' is not a module name" in out.stderr
    assert "Traceback" not in out.stderr
    # a module that registers nothing: the wrong module, or a hook's name misspelt
    (tmp_path / "misspelt_hooks.py").write_text(
        "import branchadapt as ba\n\n\n@ba.hookimpl\ndef register_lossez(register):\n    pass\n"
    )
    for module, expected in [
        ("json", "plugin module 'json' implements no branchadapt hook, so it registers nothing"),
        (
            "misspelt_hooks",
            "plugin module 'misspelt_hooks' marks ['register_lossez'] with @branchadapt.hookimpl",
        ),
    ]:
        exp.write_text(f'plugins = ["{module}"]\n' + EXPERIMENT)
        out = run_cli("validate", str(exp))
        assert out.returncode == 2 and expected in out.stderr, out.stderr


def test_duplicate_names_name_both_origins(tmp_path, run_cli, third_party):
    site = Path(third_party["PYTHONPATH"].split(os.pathsep)[0])
    dup = site / "ba_dup"
    dup.mkdir()
    (dup / "__init__.py").write_text(
        textwrap.dedent(
            """
            import branchadapt as ba
            from ba_thirdparty import Wide
            @ba.hookimpl
            def register_backbones(register):
                register(Wide, name="thirdparty_wide")
            """
        )
    )
    dist = site / "ba_dup-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ba-dup\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[branchadapt]\ndup = ba_dup\n")
    out = run_cli("plugins", env=third_party)
    assert out.returncode == 2
    assert "duplicate backbone name 'thirdparty_wide'" in out.stderr
    assert "ba-thirdparty 0.3.1" in out.stderr and "ba-dup 1.0" in out.stderr


def add_dist(site: Path, name: str, entry_points: str, module: str, source: str) -> None:
    """A second installed package in ``site``: module ``module`` and its ``branchadapt`` entry points."""
    (site / module).mkdir()
    (site / module / "__init__.py").write_text(textwrap.dedent(source))
    dist = site / f"{name}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[branchadapt]\n{entry_points}\n")


@pytest.mark.parametrize("taken", ["thirdparty", "builtin", "cartoon"])
def test_an_entry_point_name_used_twice_is_an_error_naming_both(tmp_path, run_cli, third_party, taken):
    # silently skipping the second would drop a whole plugin set (cartoon: every face component)
    site = Path(third_party["PYTHONPATH"].split(os.pathsep)[0])
    hook = "import branchadapt as ba\n@ba.hookimpl\ndef register_commands(subparsers, context):\n    pass\n"
    add_dist(site, "ba-clash", f"{taken} = ba_clash", "ba_clash", hook)
    out = run_cli("plugins", env=third_party)
    assert out.returncode == 2, out.stdout
    assert f"two plugins use the entry-point name {taken!r}" in out.stderr
    assert "'ba_clash' from ba-clash 1.0" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import os\nraise RuntimeError('no licence key')\n", "RuntimeError: no licence key"),
        ("def broken(:\n    pass\n", "SyntaxError"),
    ],
)
def test_a_plugin_that_fails_to_import_names_the_file_and_line(
    tmp_path, run_cli, third_party, source, expected
):
    site = Path(third_party["PYTHONPATH"].split(os.pathsep)[0])
    add_dist(site, "ba-broken", "broken = ba_broken", "ba_broken", source)
    out = run_cli("plugins", env=third_party)
    assert out.returncode == 2
    init = str(site / "ba_broken" / "__init__.py")
    assert f"failed to import at {init}:" in out.stderr and expected in out.stderr
    assert "fix or uninstall ba-broken" in out.stderr and "Traceback" not in out.stderr


def test_a_plugin_hook_that_raises_is_a_user_error_naming_the_plugin(tmp_path, run_cli, third_party):
    site = Path(third_party["PYTHONPATH"].split(os.pathsep)[0])
    source = """
        import branchadapt as ba
        @ba.hookimpl
        def register_tasks(register):
            raise ValueError("bad settings file")
        """
    add_dist(site, "ba-hook", "hooky = ba_hook", "ba_hook", source)
    out = run_cli("plugins", env=third_party)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "plugin 'hooky' (from ba-hook 1.0) failed in its register_tasks hook at " in out.stderr
    assert "ValueError: bad settings file" in out.stderr


def test_a_local_plugin_module_with_a_missing_dependency_says_so(tmp_path, run_cli):
    (tmp_path / "needs_dep.py").write_text("import not_installed_dependency_xyz\n")
    (tmp_path / "raises.py").write_text("x = 1 / 0\n")
    exp = tmp_path / "local.toml"
    exp.write_text('plugins = ["needs_dep"]\n' + EXPERIMENT)
    out = run_cli("validate", str(exp))
    assert out.returncode == 2
    assert (
        "plugin module 'needs_dep' imports 'not_installed_dependency_xyz', which is not installed"
        in out.stderr
    )
    assert out.stderr.count(str(exp)) == 1  # the file named once
    exp.write_text('plugins = ["raises"]\n' + EXPERIMENT)
    out = run_cli("validate", str(exp))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert (
        f"plugin module 'raises' failed to import at {tmp_path / 'raises.py'}:1: ZeroDivisionError"
        in out.stderr
    )


def test_an_unknown_name_without_a_close_match_reads_as_sentences(tmp_path, run_cli):
    exp = tmp_path / "e.toml"
    exp.write_text(
        EXPERIMENT.replace('type = "thirdparty_wide"', 'type = "zzzzqqq"').replace(
            "[losses.logit_penalty]\nweight = 0.01\npower = 2\n", ""
        )
    )
    out = run_cli("validate", str(exp))
    assert out.returncode == 2
    assert "unknown backbone 'zzzzqqq'. Registered backbones: " in out.stderr


def test_core_never_imports_a_plugin_set():
    """The core is domain-free: no module under branchadapt/ names a plugin package or a domain."""
    import re
    from pathlib import Path

    import branchadapt

    core = Path(branchadapt.__file__).parent
    pattern = re.compile(r"branchadapt_(cartoon|timm|toonfaces)|\btimm\b|cartoon|\bface", re.IGNORECASE)
    offenders = [f"{p.relative_to(core)}:{i}" for p in core.rglob("*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]  # fmt: skip
    assert offenders == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [  # a misspelt hook, and hooks without @hookimpl: the package would register nothing, unsaid
        (
            "import branchadapt as ba\n@ba.hookimpl\ndef register_lossez(register):\n    pass\n",
            "marks ['register_lossez'] with @branchadapt.hookimpl, which are not branchadapt hooks",
        ),
        ("def register_losses(register):\n    pass\n", "implements no branchadapt hook"),
    ],
)
def test_an_installed_plugin_whose_hooks_register_nothing_is_refused(
    tmp_path, run_cli, third_party, source, expected
):
    site = Path(third_party["PYTHONPATH"].split(os.pathsep)[0])
    add_dist(site, "ba-typo", "typo = ba_typo", "ba_typo", source)
    out = run_cli("plugins", env=third_party)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "plugin entry point 'typo' = 'ba_typo' (from ba-typo 1.0)" in out.stderr and expected in out.stderr
