"""Per-group copies of a branch stage, and the router telling them whose rows are whose.

:class:`BranchedModel` replaces each branch stage of a backbone by a :class:`GroupBranches` holding
one copy per group; one :class:`Router` per model, set from the batch's group ids before each
forward pass, tells every copy which rows to run.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from . import batching, rowgrad, rows
from .batching import StackedRule
from .errors import UserError
from .paramslots import ParamSlots


class Router:
    """Which sample of the current (sub-)batch belongs to which group; shared by all routers."""

    def __init__(self, groups: Sequence[str]) -> None:
        self.groups = tuple(groups)
        self.parts: list[tuple[str, Tensor | None]] = []  # (group, positions or None = all)
        self.calls = 0  # branch-stage calls in the model's current call

    def set(self, ids: Tensor, device: torch.device) -> None:
        present = torch.unique(ids).tolist()
        if len(present) == 1:
            self.parts = [(self.groups[present[0]], None)]
        else:
            self.parts = [
                (self.groups[g], torch.nonzero(ids == g).flatten().to(device, non_blocking=True))
                for g in present
            ]


class GroupBranches(nn.Module):
    """One copy of a stage per group; each sample runs through its own group's copy.

    With ``stacked = True`` (:attr:`BranchedModel.stacked`) a batch of several groups with equal row
    counts runs all copies in one ``vmap`` call, or one call of ``rule`` when the backbone gave one
    (:mod:`branchadapt.batching`); otherwise, and for good once a stage turns out not to map, in a
    loop over the groups.
    """

    rule: StackedRule | None

    def __init__(
        self, stage: nn.Module, groups: Sequence[str], router: Router, rule: StackedRule | None = None
    ) -> None:
        super().__init__()
        self.branches = nn.ModuleDict({g: copy.deepcopy(stage) for g in groups})
        self._router: Router = router  # a plain object, not a sub-module
        # the backbone's way to run the copies at once (None: vmap); never a registered sub-module
        object.__setattr__(self, "rule", rule)
        self.stacked: bool | Literal["auto"] = False
        self._unstackable: str | None = None  # why this stage runs as a loop, once known
        self._template: list[nn.Module] = []  # a meta copy for vmap, built on first use (not a child)
        self._slots: dict[str, ParamSlots] = {}  # each copy's parameters, resolved on first stacked use

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # the copies' parameters are their groups' own: no live-row restriction applies inside
        with rowgrad.paused((args, kwargs)):
            return self._forward(args, kwargs)

    def _forward(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        parts = self._router.parts
        self._router.calls += 1
        if not parts:  # outside its BranchedModel's call: no rows to route
            raise UserError(
                "a branch stage ran outside its branched model's call, so it cannot know each row's "
                "group: call the model ba.branch() returned, with groups=..., not the backbone or the "
                "stage itself (activation checkpointing that recomputes a branch stage in the backward "
                "pass is not supported either)"
            )
        if self.stacked and len(parts) > 1 and self._stackable():
            positions = [ix for _, ix in parts if ix is not None]
            auto_says_no = self.stacked == "auto" and not batching.worth_stacking(
                (args, kwargs), rows.batch_size(args, kwargs)
            )
            if len({len(ix) for ix in positions}) == 1 and not auto_says_no:  # else this batch loops
                try:
                    return self._run_stacked([g for g, _ in parts], positions, args, kwargs)
                except batching.NotStackable as err:
                    self._unstackable = str(err)
                    warnings.warn(f"branch stage runs group by group, not stacked: {err}", stacklevel=2)
        return rows.run_parts(parts, args, kwargs, lambda g, *a, **k: self.branches[g](*a, **k))

    def _stackable(self) -> bool:
        """Whether the copies can be stacked; checked, and the vmap template built, once. A stage
        that cannot be by its structure (buffers) runs as a loop without a warning: that is known
        and documented, unlike an operation that fails under vmap."""
        if self._unstackable is None and not self._template:
            copies = list(self.branches.values())
            reason = batching.stackable(copies)
            if reason is not None:
                self._unstackable = reason
                return False
            self._template.append(batching.meta_template(copies[0]))
            self._slots = {g: ParamSlots(m) for g, m in self.branches.items()}
        return self._unstackable is None

    def _run_stacked(
        self, groups: list[str], positions: list[Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        template = self._template[0]
        if template.training != self.training:
            template.train(self.training)
        params = [dict(self._slots[g].items()) for g in groups]
        batch = rows.batch_size(args, kwargs)
        return batching.run_stacked(params, template, positions, args, kwargs, batch, self.rule)
