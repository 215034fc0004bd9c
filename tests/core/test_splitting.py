"""A backbone's stage names and a splitter's answers are checked before anything is branched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import branchadapt as ba
from branchadapt.builtin.splitters import DepthOptions, DepthSplitter
from branchadapt.splitting import split
from branchadapt.stagenames import check_stage_names

GROUPS = ("big", "small")


class Net(ba.Backbone):
    def __init__(self, names):
        super().__init__()
        self.names = names
        self.enc = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        self.head = nn.Linear(4, 2)
        self.scale = nn.Parameter(torch.ones(1))

    def stage_names(self):
        return self.names

    def forward(self, x):
        return self.head(self.enc(x))


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["encc", "head"], r"Net stage 'encc': 'encc' is not a sub-module of the backbone"),
        (["scale", "head"], r"Net stage 'scale': 'scale' is not a sub-module of the backbone"),
        (["enc", "enc.0", "head"], r"Net stages 'enc' and 'enc\.0' overlap \('enc' and 'enc\.0'\)"),
        (["enc", "enc", "head"], r"Net\.stage_names\(\) lists \['enc'\] more than once"),
        ("enc", r"Net\.stage_names\(\) returned 'enc'; expected a list of non-empty strings"),
    ],
)
def test_stage_names_that_are_not_disjoint_sub_modules_are_refused(names, expected):
    with pytest.raises(ba.UserError, match=expected):
        check_stage_names(Net(names))
    # so is a branched model built from them, also when its splitter would not use the bad name
    with pytest.raises(ba.UserError, match=expected):
        ba.branch(Net(names), GROUPS, splitter="branches", low=0, top=1)


def test_a_depth_split_of_a_backbone_without_stages_is_refused():
    with pytest.raises(
        ba.UserError,
        match=r"^splitter 'branches' on Net: low=1, top=1 ask for branches, but the backbone names no stages",
    ):
        ba.branch(Net([]), GROUPS, splitter="branches", low=1, top=1)
    assert not list(ba.branch(Net([]), GROUPS, splitter="branches", low=0, top=0).branch_parameters())


class Answers(DepthSplitter):
    def __init__(self, stages, participation):
        super().__init__(DepthOptions())
        self.stages, self.answer = stages, participation

    def branch_stages(self, stage_names):
        return self.stages

    def participation(self, group, anchor):
        return self.answer


@pytest.mark.parametrize(
    ("stages", "participation", "expected"),
    [
        (
            ["head"],
            "detatched",
            r"mine: participation\('big', 'big'\) returned 'detatched'; expected one of "
            r"\['live', 'detached', 'frozen'\]",
        ),
        (["head"], None, r"participation\('big', 'big'\) returned None"),
        (
            "head",
            "live",
            r"mine: branch_stages\(\) returned 'head'; expected a list of stage names from "
            r"\['enc', 'head'\]",
        ),
    ],
)
def test_a_splitters_answers_that_are_not_what_branching_takes_name_the_splitter(
    stages, participation, expected
):
    with pytest.raises(ba.UserError, match=expected):
        split(Answers(stages, participation), "mine", Net(["enc", "head"]), GROUPS, "big")
    model = split(Answers(["head"], "detached"), "mine", Net(["enc", "head"]), GROUPS, "big")
    assert model.branch_stages == ("head",) and model.participation["small"] is ba.Participation.DETACHED


def test_stage_names_may_come_from_a_generator():
    class Lazy(Net):
        def stage_names(self):
            return (n for n in ["enc", "head"])

    assert check_stage_names(Lazy([])) == ["enc", "head"]
    model = ba.branch(Lazy([]), GROUPS, splitter="branches", low=1, top=0)
    assert model.branch_stages == ("enc",)


def test_a_run_names_the_stages_splitter_key_and_the_backbone(small_experiment, monkeypatch, capsys):
    from branchadapt.builtin.example import MLPBackbone
    from branchadapt.cli import main

    path = small_experiment()
    monkeypatch.setattr(MLPBackbone, "stage_names", lambda self: [])
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert (
        f"error: {path}: stages.transfer.splitter (splitter 'branches') on MLPBackbone: low=1, top=1 ask"
        in err
    ), err


def test_a_splitters_own_error_keeps_its_class_and_gains_its_place():
    class StageMissing(ba.UserError):
        def __init__(self, stage: str, options: object) -> None:
            super().__init__(f"no stage {stage}")

    class Picky(Answers):
        def branch_stages(self, stage_names):
            raise StageMissing("mid", self.options)

    with pytest.raises(StageMissing, match=r"^mine on Net: no stage mid$"):
        split(Picky(["head"], "live"), "mine", Net(["enc", "head"]), GROUPS, "big")


def test_a_bad_generator_of_stage_names_shows_what_it_gave():
    class Lazy(Net):
        def stage_names(self):
            return (n for n in ["enc", ""])

    with pytest.raises(ba.UserError, match=r"returned \['enc', ''\]; expected a list of non-empty strings"):
        check_stage_names(Lazy([]))
