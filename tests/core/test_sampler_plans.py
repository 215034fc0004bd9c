"""A sampler's plan is checked against the data: up front for step 0, then as each step is read."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import branchadapt as ba
from branchadapt.cli import main
from branchadapt.data import check_plan

SIZES = {"a": {"x": 4, "y": 2}, "b": {"x": 3}}

SAMPLER = '''
import branchadapt as ba

class Fixed(ba.GroupSampler):
    """Returns a plan set by the experiment's ``which`` option."""
    class Options(ba.PluginOptions):
        which: str = "good"
        bad_from: int = 0

    def plan(self, step):
        good = {"train": [("a", 0), ("a", 1)]}
        if step < self.options.bad_from:
            return good
        return {
            "good": good,
            "unknown_group": {"train": [("zz", 0)]},
            "too_far": {"train": [("a", 10**6)]},
            "negative": {"train": [("a", -1)]},
            "empty": {"train": []},
            "no_stream": {"photos": [("a", 0)]},
            "nothing": {},
        }[self.options.which]

@ba.hookimpl
def register_samplers(register):
    register(Fixed, name="fixed")
'''


@pytest.mark.parametrize(
    ("plan", "expected"),
    [
        (
            {"x": [("zz", 0)]},
            r"S: plan\(7\) picks \('zz', 0\); expected \(group, index\) with a group of \['a', 'b'\]",
        ),
        (
            {"x": [("a", 4)]},
            r"picks \('a', 4\): index out of range; group 'a' has 4 items in stream 'x', so "
            r"expected 0 <= index < 4",
        ),
        ({"x": [("a", -1)]}, r"index out of range"),
        ({"x": [("a", 1.0)]}, r"picks \('a', 1\.0\): the index is not an integer; expected 0 <= index < 4"),
        ({"x": [("a", True)]}, r"the index is not an integer"),
        ({"x": [("a", torch.tensor(True))]}, r"the index is not an integer"),
        ({"x": np.array(3)}, r"gives stream 'x' array\(3\); expected a non-empty list"),
        ({"x": torch.tensor(3)}, r"expected a non-empty list"),
        ({"x": {("a", 1), ("a", 2)}}, r"expected a non-empty list"),  # a set: no order to replay
        ({"x": [np.array(3)]}, r"expected \(group, index\)"),
        ({"x": [("a", torch.tensor(9))]}, r"index out of range"),
        ({"y": [("b", 0)]}, r"from stream 'y', in which group 'b' has no items \(its streams: \['x'\]\)"),
        ({"x": []}, r"gives stream 'x' \[\]; expected a non-empty list of \(group, index\)"),
        ({}, r"returned \{\}; expected a dict stream -> \[\(group, index\), \.\.\.\], not empty"),
        ({"x": ["a0"]}, r"picks 'a0'; expected \(group, index\)"),
    ],
)
def test_a_plan_that_does_not_fit_the_data_is_named(plan, expected):
    with pytest.raises(ba.UserError, match=expected):
        check_plan(plan, SIZES, 7, "S")


def test_a_plan_that_fits_passes_with_any_integer_index_and_any_list():
    check_plan({"x": [("a", 3), ("b", np.int64(2))], "y": [("a", 1)]}, SIZES, 0, "S")
    check_plan({"x": [("a", torch.tensor(3)), ["b", torch.tensor(2, dtype=torch.int32)]]}, SIZES, 0, "S")
    check_plan({"x": np.array([("a", 3), ("b", 1)], dtype=object), "y": (("a", 0),)}, SIZES, 0, "S")


@pytest.mark.parametrize(
    ("which", "expected"),
    [
        ("unknown_group", r"picks \('zz', 0\); expected \(group, index\) with a group of \['a'\]"),
        ("too_far", r"picks \('a', 1000000\): index out of range; group 'a' has 64 items"),
        ("negative", r"picks \('a', -1\): index out of range"),
        ("empty", r"gives stream 'train' \[\]"),
        ("no_stream", r"from stream 'photos', in which group 'a' has no items \(its streams: \['train'\]\)"),
        ("nothing", r"returned \{\}"),
    ],
)
def test_validate_refuses_a_sampler_whose_plan_does_not_fit_naming_stage_and_sampler(
    small_experiment, tmp_path, capsys, which, expected
):
    (tmp_path / "fixed_sampler.py").write_text(SAMPLER)
    path = small_experiment(extra=f'\n[stages.basic.sampler]\ntype = "fixed"\nwhich = "{which}"\n')
    path.write_text('plugins = ["fixed_sampler"]\n' + path.read_text().replace(
        'sampler = { type = "per_group", per_group = 4 }\n', "", 1))  # fmt: skip
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"error: {path}: stages.basic.sampler (fixed): plan(0) " in err, err
    assert re_search(expected, err)
    run_dir = tmp_path / "run"
    assert main(["run", str(path), "--run-dir", str(run_dir), "--no-eval"]) == 2
    assert not run_dir.exists()  # refused before anything is written


def test_a_later_steps_plan_is_checked_as_it_is_read(small_experiment, tmp_path, capsys):
    (tmp_path / "fixed_sampler.py").write_text(SAMPLER)
    path = small_experiment(
        extra='\n[stages.basic.sampler]\ntype = "fixed"\nwhich = "too_far"\nbad_from = 3\n'
    )
    path.write_text('plugins = ["fixed_sampler"]\n' + path.read_text().replace(
        'sampler = { type = "per_group", per_group = 4 }\n', "", 1))  # fmt: skip
    assert main(["run", str(path), "--run-dir", str(tmp_path / "run"), "--no-eval"]) == 2
    err = capsys.readouterr().err
    assert "stages.basic.sampler (fixed): plan(3) picks ('a', 1000000): index out of range" in err, err
    assert "Traceback" not in err


def re_search(pattern: str, text: str) -> bool:
    import re

    return re.search(pattern, text) is not None
