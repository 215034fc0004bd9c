"""Generic splitters: one shared model, or depth-cut branches with per-group participation."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field

from ..errors import UserError
from ..interfaces import BranchSplitter, Participation, PluginOptions


class SingleSplitter(BranchSplitter):
    """No branches: one model for every group, all groups update everything."""

    def branch_stages(self, stage_names: Sequence[str]) -> list[str]:
        return []

    def participation(self, group: str, anchor: str) -> Participation:
        return Participation.LIVE


class DepthOptions(PluginOptions):
    low: int = Field(1, ge=0, description="lowest (input-side) stages copied per group")
    top: int = Field(1, ge=0, description="top (output-side) stages copied per group")
    anchor: Participation = Field(Participation.LIVE, description="how the anchor group uses shared stages")
    others: Participation = Field(
        Participation.DETACHED, description="how the other groups use shared stages (detached = selective BP)"
    )
    overrides: dict[str, Participation] = Field(default_factory=dict, description="per-group exceptions")


class DepthSplitter(BranchSplitter):
    """Branches for the ``low`` first and ``top`` last stages; the middle is shared.

    ``low + top`` at least the number of stages gives every group its own full copy (per-group
    fine-tuning); ``others = "live"`` is branching without selective back-propagation.
    """

    Options = DepthOptions
    options: DepthOptions

    def branch_stages(self, stage_names: Sequence[str]) -> list[str]:
        names = list(stage_names)
        if not names and (self.options.low or self.options.top):
            raise UserError(
                f"low={self.options.low}, top={self.options.top} ask for branches, but the backbone "
                "names no stages (its stage_names() is empty); nothing would be branched"
            )
        low = names[: self.options.low]
        top = names[max(0, len(names) - self.options.top) :] if self.options.top else []
        return [n for n in names if n in low or n in top]

    def check_groups(self, groups: Sequence[str]) -> list[str]:
        return [
            f"overrides: {g!r} is not one of the groups {list(groups)}"
            for g in self.options.overrides
            if g not in groups
        ]

    def participation(self, group: str, anchor: str) -> Participation:
        if group in self.options.overrides:
            return self.options.overrides[group]
        return self.options.anchor if group == anchor else self.options.others
