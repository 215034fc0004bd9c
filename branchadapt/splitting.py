"""A splitter's decisions applied to a backbone, each checked before anything is branched.

The backbone's ``stage_names`` and the splitter's ``branch_stages`` and ``participation`` are
plugin code: a stage name that is no sub-module, two stages nested in each other, a string where a
list belongs or a participation that is none of live/detached/frozen is one message naming the
backbone or the splitter and what was expected, not a traceback from deep inside the branching.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .branched import BranchedModel
from .errors import UserError, naming
from .interfaces import Backbone, BranchSplitter, Participation

__all__ = ["check_stage_names", "split"]


def check_stage_names(backbone: Backbone) -> list[str]:
    """``backbone.stage_names()``, once each is a distinct stage whose sub-module paths exist, are
    modules and do not nest in another stage's."""
    kind = type(backbone).__name__
    given = backbone.stage_names()
    names = [] if isinstance(given, str) else list(given)  # a generator is read once, here
    if isinstance(given, str) or not all(isinstance(n, str) and n for n in names):
        shown = given if isinstance(given, str | list | tuple) else names  # a generator: what it gave
        raise UserError(f"{kind}.stage_names() returned {shown!r}; expected a list of non-empty strings")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"{kind}.stage_names() lists {twice} more than once: {names}")
    owner: dict[str, str] = {}
    for stage in names:
        for path in backbone.stage_paths(stage):
            try:
                module = backbone.get_submodule(path)
            except AttributeError as exc:
                raise UserError(
                    f"{kind} stage {stage!r}: {path!r} is not a sub-module of the backbone ({exc}); "
                    f"stage_names() must name its sub-modules: {names}"
                ) from None
            if not isinstance(module, nn.Module) or module is backbone:
                raise UserError(f"{kind} stage {stage!r}: {path!r} is not a sub-module of the backbone")
            for other, by in owner.items():
                if path == other or path.startswith(other + ".") or other.startswith(path + "."):
                    raise UserError(
                        f"{kind} stages {by!r} and {stage!r} overlap ({other!r} and {path!r}); "
                        "expected stages that are disjoint sub-modules"
                    )
            owner[path] = stage
    return names


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
