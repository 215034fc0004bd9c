"""The paper's splitters, named as in its ablations; all are presets of the core's depth splitter.

- ``selective_detach``: branches for the ``low`` lowest and ``top`` highest stages of every group;
  only the anchor group updates the shared middle (the paper's method).
- ``finetune``: one model, every group updates everything (baselines 1 and 2).
- ``per_group_finetune``: every stage is per-group: each group fine-tunes its own full copy of the
  basic model (baseline 3), trained side by side in one run.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field

from branchadapt import BranchSplitter, Participation, PluginOptions
from branchadapt.builtin.splitters import DepthOptions, DepthSplitter, SingleSplitter


class SelectiveDetachOptions(DepthOptions):
    low: int = Field(2, ge=0, description="lowest encoder stages copied per group")
    top: int = Field(2, ge=0, description="top decoder stages copied per group")


class SelectiveDetach(DepthSplitter):
    """Per-group low/top stages; few-shot groups run the shared middle detached."""

    Options = SelectiveDetachOptions


class Finetune(SingleSplitter):
    """No branches; all groups in the stage update every parameter (the paper's baselines 1-2)."""


class PerGroupFinetune(BranchSplitter):
    """Every stage per group: independent full copies, each updated only by its own group."""

    Options = PluginOptions

    def branch_stages(self, stage_names: Sequence[str]) -> list[str]:
        return list(stage_names)

    def participation(self, group: str, anchor: str) -> Participation:
        return Participation.LIVE
