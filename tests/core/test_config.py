"""Experiment files: validation messages, plugin options, extends, --set, schema."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

import branchadapt as ba
from branchadapt.loading import json_schema
from branchadapt.reading import apply_override


def error_of(path, overrides=()):
    with pytest.raises(ba.ConfigError) as info:
        ba.load_experiment(path, overrides)
    return str(info.value)


def test_plugin_option_errors_name_file_and_dotted_key(small_experiment):
    path = small_experiment()
    msg = error_of(path, ["stages.transfer.losses.cross_entropy.weight=-1"])
    assert str(path) in msg
    assert (
        "stages.transfer.losses.cross_entropy.weight: Input should be greater than or equal to 0 (got -1)"
        in msg
    )


def test_plugin_specific_option_is_validated(small_experiment):
    msg = error_of(small_experiment(), ["losses.cross_entropy.label_smoothing=1.5"])
    # inherited by both stages, reported once at the key the user wrote
    assert msg.count("label_smoothing") == 1
    assert "losses.cross_entropy.label_smoothing: Input should be less than 1 (got 1.5)" in msg


def test_unknown_keys_suggest_the_right_one(small_experiment):
    msg = error_of(small_experiment(), ["model.hiden=[4]", "stages.basic.stepz=3"])
    assert "model.hiden: unknown key; did you mean hidden?" in msg
    assert "stages.basic.stepz: unknown key; did you mean steps?" in msg
    assert "2 problems" in msg


def test_unknown_plugin_name_lists_closest(small_experiment):
    msg = error_of(small_experiment(), ['stages.transfer.splitter.type="branchez"'])
    assert "stages.transfer.splitter.type: unknown splitter 'branchez'; did you mean 'branches'?" in msg
    assert re.search(r"Registered splitters: branches, .*single", msg)


def test_references_are_checked(small_experiment):
    # whole-file checks name their own key, without pydantic's "(top level): Value error, " before it
    init = error_of(small_experiment(), ['stages.basic.init_from="transfer"'])
    assert "\n  stages.basic.init_from: 'transfer' is not an earlier enabled stage" in init
    assert "stages.basic.groups: 'zz' is not one of the groups" in error_of(
        small_experiment(), ['stages.basic.groups=["zz"]']
    )
    anchor = error_of(small_experiment(), ['anchor="q"'])
    assert "\n  anchor: 'q' is not one of the groups" in anchor and "top level" not in anchor
    assert "unique" in error_of(small_experiment(), ['groups=["a", "a"]'])
    # a disabled stage trains nothing, so it cannot be where a later one starts from
    disabled = error_of(small_experiment(), ["stages.basic.enabled=false"])
    assert "stages.transfer.init_from: 'basic' is not an earlier enabled stage (earlier: none)" in disabled
    alone = small_experiment()
    alone.write_text(alone.read_text().replace('init_from = "basic"\n', ""))
    nothing = error_of(alone, ["stages.basic.enabled=false", "stages.transfer.enabled=false"])
    assert "stages: every stage is disabled; enable at least one" in nothing


def test_a_stage_component_of_another_type_replaces_the_top_level_one(small_experiment):
    """A stage's sampler of another type takes none of the top-level sampler's options (they
    mean nothing to it); one of the same type merges over them."""
    path = small_experiment()
    exp = ba.load_experiment(
        path,
        [
            'sampler={type = "per_group", per_group = 3}',
            'stages.basic.sampler={type = "mixed", batch_size = 8}',
            "stages.transfer.sampler={}",
        ],
    )
    basic, transfer = (stage.spec.sampler for stage in exp.stages)
    assert (basic.type, basic.model_dump(exclude={"type"})) == ("mixed", {"batch_size": 8})
    assert (transfer.type, transfer.model_dump(exclude={"type"})) == ("per_group", {"per_group": 3})


def test_malformed_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    assert f"{bad.resolve()}: not valid TOML" in error_of(bad)
    assert "not found" in error_of(tmp_path / "missing.toml")
    child = tmp_path / "sub" / "child.toml"
    child.parent.mkdir()
    child.write_text('extends = "../bad.toml"\n')
    assert f"{bad.resolve()} (the base of {child.resolve()}): not valid TOML" in error_of(child)


def test_extends_and_override(small_experiment, tmp_path):
    small_experiment(name="base.toml")
    child = tmp_path / "variant.toml"
    child.write_text(
        'extends = "base.toml"\nname = "variant"\n[stages.transfer.splitter]\nlow = 2\nothers = "live"\n'
    )
    exp = ba.load_experiment(child, ["stages.transfer.steps=9"])
    transfer = exp.stages[1]
    assert exp.spec.name == "variant"
    assert transfer.splitter.options.low == 2 and transfer.splitter.options.top == 1
    assert transfer.splitter.options.others == ba.Participation.LIVE
    assert transfer.spec.steps == 9
    assert exp.config_hash != ba.load_experiment(tmp_path / "base.toml").config_hash


def test_extends_cycle_is_reported(tmp_path):
    (tmp_path / "a.toml").write_text('extends = "b.toml"\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n')
    assert "cycle" in error_of(tmp_path / "a.toml")


def test_stage_can_disable_a_loss_and_a_stage(small_experiment):
    extra = '[losses.smooth]\ntype = "cross_entropy"\nlabel_smoothing = 0.1\n'
    exp = ba.load_experiment(small_experiment(extra=extra), ["stages.basic.losses.smooth.enabled=false"])
    assert list(exp.stages[0].losses) == ["cross_entropy"]
    assert list(exp.stages[1].losses) == ["cross_entropy", "smooth"]
    assert exp.stages[1].losses["smooth"].options.label_smoothing == 0.1
    exp = ba.load_experiment(small_experiment(), ["stages.transfer.enabled=false"])
    assert [s.name for s in exp.stages] == ["basic"]
    # a stage left with no loss at all is caught when the file loads, not when that stage starts
    with pytest.raises(ba.ConfigError, match=r"stages\.transfer\.losses: no enabled loss terms"):
        ba.load_experiment(small_experiment(), ["stages.transfer.losses.cross_entropy.enabled=false"])


def test_a_top_level_sampler_every_stage_overrides_is_still_checked(small_experiment):
    # both stages of the small experiment name their own sampler: the top-level one is unused
    assert "sampler.type: unknown sampler 'nope'" in error_of(small_experiment(), ['sampler.type="nope"'])


def test_a_folder_given_as_the_experiment_file_says_so(tmp_path):
    with pytest.raises(ba.ConfigError, match=r"is a folder; expected a \.toml file"):
        ba.load_experiment(tmp_path)


def test_apply_override_paths():
    data = {"stages": {"s": {"steps": 1}}, "groups": ["a", "b"]}
    apply_override(data, "stages.s.steps=5")
    apply_override(data, "groups[1]=c")
    apply_override(data, 'data.root="x y"')
    assert data == {"stages": {"s": {"steps": 5}}, "groups": ["a", "c"], "data": {"root": "x y"}}
    with pytest.raises(ba.ConfigError, match=r"KEY\.PATH=VALUE"):
        apply_override(data, "nothing")


def test_an_override_naming_a_misspelt_stage_is_refused_not_added():
    data = {"stages": {"basic": {"steps": 1}, "transfer": {"steps": 2}}}
    with pytest.raises(
        ba.ConfigError, match=r"no stage 'tranfser'; did you mean 'transfer'\? Stages: basic, transfer"
    ):
        apply_override(data, "stages.tranfser.steps=3")
    assert data == {"stages": {"basic": {"steps": 1}, "transfer": {"steps": 2}}}
    apply_override(data, "stages.finetune.steps=4")  # a name unlike any stage: a new stage
    assert data["stages"]["finetune"] == {"steps": 4}


def test_an_override_value_meant_as_toml_must_parse():
    data: dict = {}
    for text in ("[1", "{a = 1", '"unclosed'):
        with pytest.raises(ba.ConfigError, match="the value is not valid TOML"):
            apply_override(data, f"stages.basic.steps={text}")
    apply_override(data, "name=plain words")  # a bare string stays a string
    assert data == {"name": "plain words"}


def test_schema_includes_plugin_options():
    schema = json_schema()
    assert "stages" in schema["properties"]
    assert "label_smoothing" in schema["x-branchadapt-plugins"]["loss"]["cross_entropy"]["properties"]
    assert "low" in schema["x-branchadapt-plugins"]["splitter"]["branches"]["properties"]
    assert schema["properties"]["extends"]["type"] == "string"  # variant files use it


def test_config_doc_lists_every_key():
    from branchadapt.config import StageSpec, TrainSpec

    doc = (Path(__file__).resolve().parents[2] / "docs" / "config.md").read_text()
    for model in (ba.config.Experiment, StageSpec, TrainSpec):
        missing = [name for name in model.model_fields if f"`{name}`" not in doc]
        assert not missing, f"docs/config.md does not mention {model.__name__} keys {missing}"


def test_a_sampler_table_without_type_takes_the_default_type(small_experiment):
    # the file has no top-level [sampler] table: --set creates one without a type
    exp = ba.load_experiment(small_experiment(), ["sampler.per_group=5"])
    assert exp.spec.sampler.type == "per_group" and exp.spec.sampler.options() == {"per_group": 5}
    assert [stage.sampler.options.per_group for stage in exp.stages] == [4, 2]  # the stages' own win


def test_cli_validate_schema_and_errors(small_experiment, run_cli):
    path = small_experiment()
    ok = run_cli("validate", str(path), "--set", "stages.transfer.splitter.low=2")
    assert ok.returncode == 0, ok.stderr
    assert "stage transfer: 6 steps" in ok.stdout
    bad = run_cli("validate", str(path), "--set", "stages.transfer.losses.cross_entropy.weight=-1")
    assert bad.returncode == 2
    assert "stages.transfer.losses.cross_entropy.weight" in bad.stderr
    assert "Traceback" not in bad.stderr
    schema = run_cli("schema")
    assert schema.returncode == 0
    assert json.loads(schema.stdout)["title"] == "Experiment"


def test_relative_paths_in_plugin_options_are_taken_beside_the_experiment_file(tmp_path):
    from branchadapt.interfaces import PluginOptions
    from branchadapt.paths import relative_to

    class Options(PluginOptions):
        weights: Path | None = None
        extra: list[Path] = []
        count: int = 1

    assert Options(weights="w.pt").weights == Path("w.pt")  # a library call: the working directory
    with relative_to(tmp_path / "exp"):
        inside = Options(weights="w.pt", extra=["a", "/abs", "~/h"], count=2)
        assert Options().weights is None
    assert inside.weights == tmp_path / "exp" / "w.pt" and inside.count == 2
    assert inside.extra == [tmp_path / "exp" / "a", Path("/abs"), Path.home() / "h"]


def test_adam_betas_must_be_decay_rates(small_experiment):
    with pytest.raises(ba.ConfigError, match=r"optim.default.betas\[0\]: Input should be less than 1"):
        ba.load_experiment(small_experiment(), ["optim.default.betas=[1.5, 0.9]"])
    with pytest.raises(ba.ConfigError, match=r"optim.default.betas\[1\]: Input should be greater than"):
        ba.load_experiment(small_experiment(), ["optim.default.betas=[0.5, -0.1]"])


def test_extends_replaces_a_component_table_whose_type_changes(tmp_path):
    from branchadapt.config import deep_merge

    base = {"stages": {"t": {"splitter": {"type": "branches", "low": 2}, "steps": 3}}}
    same = deep_merge(base, {"stages": {"t": {"splitter": {"low": 1}}}})
    assert same["stages"]["t"]["splitter"] == {"type": "branches", "low": 1}
    other = deep_merge(base, {"stages": {"t": {"splitter": {"type": "single"}}}})
    assert other["stages"]["t"] == {"splitter": {"type": "single"}, "steps": 3}


def test_splitter_overrides_must_name_groups_of_the_experiment(small_experiment):
    path = small_experiment()
    with pytest.raises(
        ba.ConfigError, match=r"stages\.transfer\.splitter\.overrides: 'B' is not one of the groups"
    ):
        ba.load_experiment(path, ['stages.transfer.splitter.overrides={B="live"}'])
    with pytest.raises(ba.ConfigError, match=r"(?m)^  splitter\.overrides: 'z' is not one of the groups"):
        ba.load_experiment(path, ['splitter={type="branches", overrides={z="frozen"}}'])
    exp = ba.load_experiment(path, ['stages.transfer.splitter.overrides={b="live"}'])
    assert exp.stages[1].splitter.options.overrides == {"b": ba.Participation.LIVE}


def test_scalars_must_have_their_toml_type(small_experiment):
    """pydantic alone turns "no" into True for a boolean and true into 1 for a number."""
    msg = error_of(
        small_experiment(),
        [
            'train.fused_optimizers="no"',
            'train.stack_branches="on"',
            "seed=true",
            'losses.cross_entropy.weight="0.5"',
            "data.noise=false",
        ],
    )
    assert "5 problems" in msg
    for line in [
        "train.fused_optimizers: expected a boolean (true or false), not a string (got 'no')",
        "train.stack_branches: expected a boolean (true or false) or \"auto\", not another string (got 'on')",
        "seed: expected an integer, not a boolean (got True)",
        "losses.cross_entropy.weight: expected a number, not a string (got '0.5')",  # plugin options too
        "data.noise: expected a number, not a boolean (got False)",
    ]:
        assert line in msg
    exp = ba.load_experiment(  # what TOML means stays accepted: an integer for a number, "auto"
        small_experiment(), ["train.stack_branches='auto'", "losses.cross_entropy.weight=2", "data.noise=1"]
    )
    assert exp.spec.train.stack_branches == "auto" and exp.data.options.noise == 1.0


def test_items_of_arrays_and_tables_must_have_their_toml_type_too(small_experiment):
    msg = error_of(
        small_experiment(),
        ['data.counts={a="64", b=8, c=8}', 'optim.default.betas=["0.9", 0.99]', "groups=['a', 'b', 3]"],
    )
    assert "data.counts.a: expected an integer, not a string (got '64')" in msg  # a plugin's table
    assert "optim.default.betas[0]: expected a number, not a string (got '0.9')" in msg
    assert "groups[2]: expected a string, not an integer (got 3)" in msg


def test_scalar_checks_leave_paths_enums_and_containers_to_their_fields():
    from typing import Annotated, Any, Literal

    from pydantic import Field

    from branchadapt.scalars import check_scalar

    assert check_scalar(Path | None, "x.safetensors") == "x.safetensors"
    assert check_scalar(ba.Participation, "frozen") == "frozen"
    assert check_scalar(list[int], "x") == "x" and check_scalar(bool, [1]) == [1]
    assert check_scalar(Annotated[float, Field(ge=0)], 3) == 3
    with pytest.raises(ValueError, match=r'expected "a" or "b", not another string'):
        check_scalar(Literal["a", "b"], "c")
    with pytest.raises(ValueError, match="expected 1 or 2, not a boolean"):
        check_scalar(Literal[1, 2], True)
    with pytest.raises(ValueError, match="expected 1 or 2, not another integer"):
        check_scalar(Literal[1, 2], 3)
    with pytest.raises(
        ValueError, match=r"^\[0\]\.x: expected a boolean \(true or false\), not a string \(got 'no'\)$"
    ):
        check_scalar(list[dict[str, bool]] | None, [{"x": "no"}])
    assert check_scalar(dict[str, Any], {"x": "no"}) == {"x": "no"}  # Any takes anything
    assert check_scalar(int, 8.0) == 8.0  # a whole number, as pydantic takes it
    with pytest.raises(ValueError, match="expected an integer, not a number"):
        check_scalar(int, 8.5)
    assert check_scalar(Literal["a", "b"], np.str_("b")) == "b"  # str subclasses (numpy, str enums)
    assert check_scalar(tuple[int, ...], [1, 2, 3]) == [1, 2, 3]


def test_a_field_converting_its_own_raw_values_is_left_to_it():
    from typing import Annotated

    from pydantic import BeforeValidator

    def thousands(v):  # type: ignore[no-untyped-def]
        return int(v[:-1]) * 1000 if isinstance(v, str) else v

    class Options(ba.PluginOptions):
        n: Annotated[int, BeforeValidator(thousands)] = 1
        k: int = 0

    assert Options(n="2k").n == 2000
    with pytest.raises(ValueError, match="expected an integer, not a string"):
        Options(k="2k")


def test_an_override_with_an_empty_key_part_a_stage_table_typo_or_extends_is_refused():
    data = {"stages": {"basic": {"steps": 1}, "transfer": {"steps": 2}}}
    for bad in ("stages..steps=3", ".a=1", "a.=1", "[0]=1"):
        with pytest.raises(ba.ConfigError, match="has an empty part"):
            apply_override(data, bad)
    with pytest.raises(ba.ConfigError, match=r"no stage 'trasnfer'; did you mean 'transfer'\?"):
        apply_override(data, "stages.trasnfer={steps=3}")  # a whole table, not only a dotted key
    with pytest.raises(ba.ConfigError, match="the base file is named in the experiment file"):
        apply_override(data, 'extends="base.toml"')
    assert data == {"stages": {"basic": {"steps": 1}, "transfer": {"steps": 2}}}  # nothing changed
    apply_override(data, "stages.finetune={steps=4}")  # unlike every stage: a new one
    assert data["stages"]["finetune"] == {"steps": 4}


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "losses.cross_entropy.weight=inf",
            "losses.cross_entropy.weight: Input should be a finite number (got inf)",
        ),
        ("optim.default.lr=nan", "optim.default.lr: Input should be a finite number (got nan)"),
        ("data.distortion=-inf", "data.distortion: Input should be a finite number (got -inf)"),
        ("seed=99999999999999999999", "seed: Input should be less than 4611686018427387904"),
        ('name=""', "name: expected one folder name"),
        ('name="../elsewhere"', "name: expected one folder name"),
    ],
)
def test_values_no_run_can_use_are_refused_when_the_file_loads(small_experiment, override, expected):
    """TOML's inf and nan, a seed torch cannot take, a name that is not one folder: refused at
    validation, not found by a traceback (or a folder outside runs/) once the run has started."""
    assert expected in error_of(small_experiment(), [override])


def test_a_stage_s_own_loss_is_named_at_its_stage_and_other_slips_once(small_experiment):
    typo = error_of(small_experiment(), ["stages.basic.losses.cross_entropyy.weight=2"])
    assert (
        "\n  stages.basic.losses.cross_entropyy.type: unknown loss 'cross_entropyy'; did you mean 'cross_entropy'"
        in typo
    )
    not_a_table = error_of(small_experiment(), ["stages=3"])
    assert not_a_table.endswith(
        "1 problem in the experiment\n  stages: Input should be a valid dictionary (got 3)"
    )
    no_groups = error_of(small_experiment(), ["stages.basic.groups=[]"])  # was taken as "every group"
    assert "stages.basic.groups: List should have at least 1 item" in no_groups


def test_a_byte_order_mark_is_read_past(small_experiment):
    path = small_experiment()
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # as some Windows editors save UTF-8
    assert ba.load_experiment(path).spec.name == "small"
