"""`branchadapt plugins NAME`: a registered implementation's options, each key as an experiment
file writes it with its default in TOML and its description."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import BaseModel, Field

import branchadapt as ba
from branchadapt.cli import main
from branchadapt.optionsdoc import option_rows, toml_default


class Inner(BaseModel):
    seed: int = Field(0, description="the seed")
    names: list[str] | None = None


class Outer(ba.PluginOptions):
    size: int = Field(description="required, no default")
    mode: Literal["a", "b"] = Field("a", description="which")
    switch: bool | Literal["auto"] = "auto"
    policy: ba.Participation = ba.Participation.DETACHED
    table: dict[str, float] = Field(default_factory=lambda: {"x": 1.5})
    inner: Inner = Field(default_factory=Inner)


def test_rows_write_defaults_as_toml_and_flatten_nested_options():
    rows = {r.key: (r.default, r.description) for r in option_rows(Outer)}
    assert rows == {
        "size": ("required", "required, no default"),
        "mode": ('"a"', 'which (one of: "a", "b")'),
        "switch": ('"auto"', '(one of: true, false, "auto")'),
        "policy": ('"detached"', '(one of: "live", "detached", "frozen")'),
        "table": ("{ x = 1.5 }", ""),
        "inner.seed": ("0", "the seed"),
        "inner.names": ("none", ""),
    }
    assert toml_default({"a": [1, 'b"c'], "e": {}}) == '{ a = [1, "b\\"c"], e = {} }'


def test_the_command_prints_one_plugin_s_options(capfd):
    assert main(["plugins", "mlp", "--markdown"]) == 0
    out = capfd.readouterr().out
    assert out.startswith("`mlp` (backbone): Multi-layer perceptron")
    assert "| `hidden` | `[32, 32]` | width of each hidden stage (at least one) |" in out
    assert main(["plugins", "cross_entropy", "--kind", "loss"]) == 0
    assert "label_smoothing" in capfd.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["plugins", "mpl"], "error: no plugin is registered as 'mpl'; did you mean 'mlp'?"),
        (["plugins", "mlp", "--kind", "loss"], "error: no loss plugin is registered as 'mlp'"),
    ],
)
def test_an_unknown_name_is_one_message_and_exit_2(argv, message, capfd):
    assert main(argv) == 2
    err = capfd.readouterr().err
    assert err.startswith(message) and "Traceback" not in err


def test_the_listing_takes_kind_and_refuses_markdown_without_a_name(capfd):
    assert main(["plugins", "--kind", "sampler"]) == 0
    listed = capfd.readouterr().out
    assert "per_group" in listed and "mixed" in listed and "mlp" not in listed and "translate" not in listed
    assert main(["plugins", "--markdown"]) == 2
    assert "error: --markdown prints one plugin's options: give its name" in capfd.readouterr().err
