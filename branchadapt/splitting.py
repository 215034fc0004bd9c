"""A splitter's decisions applied to a backbone, each checked before anything is branched.

The backbone's ``stage_names`` (:mod:`.stagenames`) and the splitter's ``branch_stages`` and
``participation`` are plugin code: a string where a list belongs or a participation that is none
of live/detached/frozen is one message naming the splitter and what was expected, not a traceback
from deep inside the branching.
"""

from __future__ import annotations

from collections.abc import Sequence

from .branched import BranchedModel
from .errors import UserError, naming
from .interfaces import Backbone, BranchSplitter, Participation
from .stagenames import check_stage_names

__all__ = ["split"]


def split(
    splitter: BranchSplitter, label: str, backbone: Backbone, groups: Sequence[str], anchor: str
) -> BranchedModel:
    """``backbone`` branched for ``groups`` as ``splitter`` (named ``label`` in messages) says."""
    names = check_stage_names(backbone)
    with naming(f"{label} on {type(backbone).__name__}"):  # the splitter's own words, placed
        branches = splitter.branch_stages(names)
    if isinstance(branches, str) or not all(isinstance(b, str) for b in branches):
        raise UserError(
            f"{label}: branch_stages() returned {branches!r}; expected a list of stage names from {names}"
        )
    policy = {}
    for group in groups:
        value = splitter.participation(group, anchor)
        try:
            policy[group] = Participation(value)
        except ValueError:
            raise UserError(
                f"{label}: participation({group!r}, {anchor!r}) returned {value!r}; expected one of "
                f"{[p.value for p in Participation]} (branchadapt.Participation)"
            ) from None
    return BranchedModel(backbone, groups, list(branches), policy)
