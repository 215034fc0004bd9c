"""A plugin author's usual mistakes are refused when the plugin loads, naming the plugin."""

from __future__ import annotations

import argparse
import textwrap

import pytest
from pydantic import Field, ValidationError

import branchadapt as ba
from branchadapt.cli import main
from branchadapt.plugins import PluginSet

HEADER = """
import torch
from torch import nn
from pydantic import BaseModel, Field
import branchadapt as ba
"""


def load(tmp_path, name: str, source: str) -> PluginSet:
    (tmp_path / f"{name}.py").write_text(HEADER + textwrap.dedent(source))
    plugins = PluginSet(entry_points=False)
    plugins.load_modules([name], tmp_path, where="exp.toml")
    return plugins


def test_a_hook_with_other_arguments_than_the_hookspec_names_the_expected_ones(tmp_path):
    source = """
        @ba.hookimpl
        def register_losses(reg):
            pass
        """
    with pytest.raises(ba.UserError) as info:
        load(tmp_path, "wrong_args", source)
    message = str(info.value)
    assert message.startswith("plugin 'local:wrong_args' (from wrong_args (local module)) has a hook")
    assert "{'reg'}" in message and message.endswith("expected register_losses(register)")


def test_an_abstract_class_is_refused_naming_what_it_lacks(tmp_path):
    source = """
        class NoStages(ba.Backbone):
            def forward(self, x):
                return x

        @ba.hookimpl
        def register_backbones(register):
            register(NoStages, name="nostages")
        """
    with pytest.raises(ba.UserError, match=r"backbone 'nostages' \(abstract_one\.NoStages\), which is abstract: "
                       r"it does not implement \['stage_names'\]"):  # fmt: skip
        load(tmp_path, "abstract_one", source)


def test_options_that_are_not_plugin_options_are_refused(tmp_path):
    source = """
        class Plain(BaseModel):  # would let a typo in the experiment pass silently
            hidden: int = 3

        class Net(ba.Backbone):
            Options = Plain
            def stage_names(self):
                return []
            def forward(self, x):
                return x

        class Loose(ba.LossTerm):
            Options = ba.PluginOptions  # a loss's options need weight, phase and enabled
            def forward(self, outputs, batch):
                return outputs["x"].mean()

        @ba.hookimpl
        def register_backbones(register):
            register(Net, name="plain_opts")

        @ba.hookimpl
        def register_losses(register):
            register(Loose, name="loose")
        """
    with pytest.raises(ba.UserError, match=r"backbone 'plain_opts' with Options = .*Plain'>; expected a "
                       r"subclass of branchadapt\.PluginOptions"):  # fmt: skip
        load(tmp_path, "plain_options", source)
    source = source.replace("register(Net, name=", "pass  # register(Net, name=")
    with pytest.raises(ba.UserError, match=r"loss 'loose' .*expected a subclass of branchadapt\.LossOptions"):
        load(tmp_path, "plain_loss_options", source)


def test_a_default_that_breaks_its_own_constraint_is_an_error():
    class Opts(ba.PluginOptions):
        hidden: int = Field(0, ge=1)
        name: int = "sixteen"  # type: ignore[assignment]

    with pytest.raises(ValidationError) as info:
        Opts()
    assert {e["loc"][0] for e in info.value.errors()} == {"hidden", "name"}
    assert Opts(hidden=2, name=3).hidden == 2


def test_a_plugin_command_that_fails_or_clashes_names_the_plugin(tmp_path, monkeypatch, capsys):
    plugins = load(
        tmp_path,
        "clashing",
        """
        @ba.hookimpl
        def register_commands(subparsers, context):
            subparsers.add_parser("run")
        """,
    )
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run")
    with pytest.raises(ba.UserError, match=r"plugin 'local:clashing' \(from clashing \(local module\)\) failed "
                       r"in its register_commands hook at .*: ArgumentError: .*conflicting subparser: run"):  # fmt: skip
        plugins.commands(sub)
    # a command without the handler the CLI calls: one message, exit 2
    no_handler = load(
        tmp_path,
        "no_handler",
        """
        @ba.hookimpl
        def register_commands(subparsers, context):
            subparsers.add_parser("hello").set_defaults(func=print)
        """,
    )
    monkeypatch.setattr("branchadapt.cli.default_plugins", lambda: no_handler)
    assert main(["hello"]) == 2
    err = capsys.readouterr().err
    assert "command 'hello' has no handler" in err and "set_defaults(handler=fn)" in err


def test_hooks_pluggy_allows_are_not_refused(tmp_path, monkeypatch, capsys):
    plugins = load(
        tmp_path,
        "lenient",
        """
        @ba.hookimpl
        def register_commands(subparsers, context=None):  # a default: pluggy passes it all the same
            seen = type(context).__name__
            hello = subparsers.add_parser("hello", help="say hello")
            hello.set_defaults(handler=lambda args: print("hello", seen) or 0)

        @ba.hookimpl(optionalhook=True)  # a hook of a newer branchadapt: skipped, not a typo
        def register_exporters(register):
            pass
        """,
    )
    monkeypatch.setattr("branchadapt.cli.default_plugins", lambda: plugins)
    assert main(["hello"]) == 0
    assert capsys.readouterr().out == "hello PluginSet\n"
    assert main(["plugins"]) == 0  # the command is listed with the plugin that added it
    rows = [line for line in capsys.readouterr().out.splitlines() if " hello " in line]
    assert len(rows) == 1 and "command" in rows[0] and "lenient" in rows[0] and "say hello" in rows[0], rows
    with pytest.raises(
        ba.UserError, match=r"'only_optional' implements no branchadapt hook, so it registers nothing"
    ):
        load(tmp_path, "only_optional", """
            @ba.hookimpl(optionalhook=True)  # optional and misspelt: nothing of this branchadapt's
            def register_lossses(register):
                pass
            """)  # fmt: skip


def test_the_name_given_to_register_wins_then_a_class_s_name_then_its_class_name(tmp_path):
    plugins = load(
        tmp_path,
        "naming",
        """
        from branchadapt.builtin.samplers import PerGroupSampler

        class Named(PerGroupSampler):
            name = "by_attribute"

        class Plain(PerGroupSampler):
            pass

        @ba.hookimpl
        def register_samplers(register):
            register(Named, name="explicit")
            register(type("Other", (Named,), {}))
            register(Plain)
        """,
    )
    names = {e.name for e in plugins.registry if e.origin == "naming (local module)"}
    assert names == {"explicit", "by_attribute", "Plain"}
