"""The branched model: per-group copies of some stages, shared rest, selective back-propagation.

``BranchedModel`` wraps a trained :class:`~branchadapt.Backbone` without editing its code: every
branch stage is replaced in place by a :class:`GroupBranches` router holding one copy per group.
A mixed batch is split by *participation* (live / detached / frozen): live samples run through the
backbone as is; detached and frozen samples run through ``torch.func.functional_call`` with the
shared parameters swapped for ``.detach()``-ed views of themselves. Gradients therefore still flow
through the shared stages into the group's lower branch stages, while the shared parameters get
nothing from that group's losses -- without copying the shared module.

With ``fused = True`` (``train.fuse_participation``) and a backbone that declares
``rows_independent``, live and detached rows instead run as one call, live rows first, under
:class:`branchadapt.rowgrad.LiveRows`: every operation meeting a shared parameter takes its weight
gradient from the live rows only. Same gradients, half the calls through the shared stages; where
the mode meets an operation it cannot restrict, the model says so once and runs separate calls.
``fused = "auto"`` fuses a batch on an accelerator, and on a CPU only while its inputs take at most
:data:`FUSE_AUTO_MAX_BYTES`: on small inputs the per-call cost dominates and one call wins; on large
ones separate calls were faster on a CPU (docs/performance.md).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from . import batching, rowgrad, rows, statekeys
from .errors import CheckpointError, UserError
from .interfaces import Backbone, Participation
from .paramslots import ParamSlots
from .routing import GroupBranches, Router
from .stagenames import check_stage_names
from .statekeys import check_shapes, diff_message, plain_from_any

#: ``fused = "auto"`` fuses a CPU batch whose batched inputs take at most this many bytes
FUSE_AUTO_MAX_BYTES = 512 << 10

BRANCHES = statekeys.BRANCHES  # attribute of GroupBranches holding the per-group copies
__all__ = ["BRANCHES", "FUSE_AUTO_MAX_BYTES", "BranchedModel", "GroupBranches", "Router", "check_group_names"]
_FUSABLE = {Participation.LIVE, Participation.DETACHED}  # participations one call can serve


def _auto_switch(name: str, value: Any) -> bool | Literal["auto"]:
    if value != "auto" and not isinstance(value, bool):
        raise ValueError(f"{name} must be True, False or 'auto', got {value!r}")
    return value


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def check_group_names(groups: Sequence[str]) -> None:
    """At least one group, each a distinct non-empty name without a dot (they name sub-modules)."""
    if isinstance(groups, str):  # a string is a sequence of one-letter names: never what is meant
        raise UserError(f"groups: expected a list of group names, got the string {groups!r}")
    if not groups:
        raise UserError("a branched model needs at least one group")
    bad = [g for g in groups if not isinstance(g, str) or not g or "." in g]
    if bad:
        raise UserError(f"group names must be non-empty strings without a dot, got {bad}")
    twice = sorted({g for g in groups if list(groups).count(g) > 1})
    if twice:
        raise UserError(f"group names must be distinct; {twice} appear more than once")


class BranchedModel(nn.Module):
    """A backbone with per-group branch stages and per-group participation in the shared stages.

    ``stacked``: several groups' branch copies as one vmap call (:class:`GroupBranches`);
    ``fused``: live and detached rows as one call through the shared stages (module docstring).
    """

    def __init__(
        self,
        backbone: Backbone,
        groups: Sequence[str],
        branch_stages: Sequence[str] = (),
        participation: Mapping[str, Participation] | None = None,
        stacked: bool | Literal["auto"] = False,
        fused: bool | Literal["auto"] = False,
    ) -> None:
        super().__init__()
        check_group_names(groups)
        if any(isinstance(m, GroupBranches) for m in backbone.modules()):
            raise UserError(
                f"this {type(backbone).__name__} is already branched (a BranchedModel replaced its branch "
                "stages in place); branch a fresh backbone, or a copy.deepcopy of an unbranched one"
            )
        stage_names = check_stage_names(backbone)
        unknown = [s for s in branch_stages if s not in stage_names]
        if unknown:
            raise UserError(
                f"branch stages {unknown} are not stages of {type(backbone).__name__}: {stage_names}"
            )
        self.groups = tuple(groups)
        self.branch_stages = tuple(s for s in stage_names if s in set(branch_stages))
        #: sub-module paths replaced by routers (a stage may span several sibling modules)
        self.branch_paths = tuple(p for s in self.branch_stages for p in backbone.stage_paths(s))
        policy = dict(participation or {})
        strangers = [g for g in policy if g not in groups]
        if strangers:
            raise UserError(f"participation names groups {strangers} that are not among {list(groups)}")
        self.participation = {g: Participation(policy.get(g, Participation.LIVE)) for g in self.groups}
        self.router = Router(self.groups)
        for path in self.branch_paths:
            stage = backbone.get_submodule(path)
            rule = backbone.stacked_rule(path, stage)
            _set_submodule(backbone, path, GroupBranches(stage, self.groups, self.router, rule))
        self.backbone = backbone
        prefixes = tuple(f"{p}." for p in self.branch_paths)
        self._shared = ParamSlots(backbone, keep=lambda n: not n.startswith(prefixes))
        self._shared_names = self._shared.names
        self._shared_buffers = [n for n, _ in backbone.named_buffers() if not n.startswith(prefixes)]
        branch_roots = {id(backbone.get_submodule(p)) for p in self.branch_paths}
        self._shared_modules = list(_modules_outside(backbone, branch_roots))
        self.stacked = stacked
        self.fused = fused
        self._unfusable: str | None = None  # why live and detached rows run as separate calls, once known
        self._said_bypassed = False  # warned that a forward ran no branch stage
        self._said_unfusable = False
        if not getattr(backbone, "rows_independent", False):
            self._unfusable = f"{type(backbone).__name__} does not declare rows_independent"
        elif any(True for _ in backbone.buffers()):
            self._unfusable = f"{type(backbone).__name__} has buffers (detached rows must not update them)"

    @property
    def stacked(self) -> bool | Literal["auto"]:
        """Whether several groups' branch copies run as one ``vmap`` call (see :class:`GroupBranches`);
        ``"auto"``: where the batch is small or on an accelerator (:func:`batching.worth_stacking`)."""
        return self._stacked

    @stacked.setter
    def stacked(self, value: bool | Literal["auto"]) -> None:
        self._stacked = _auto_switch("stacked", value)
        for path in self.branch_paths:
            router = self.backbone.get_submodule(path)
            assert isinstance(router, GroupBranches)
            router.stacked = self._stacked

    @property
    def fused(self) -> bool | Literal["auto"]:
        """Whether live and detached groups of a batch run as one call (module docstring);
        ``"auto"``: where the batch is small (:data:`FUSE_AUTO_MAX_BYTES`) or on an accelerator."""
        return self._fused

    @fused.setter
    def fused(self, value: bool | Literal["auto"]) -> None:
        self._fused = _auto_switch("fused", value)

    # ------------------------------------------------------------------ forward
    def forward(self, *args: Any, groups: Tensor | Sequence[int] | None = None, **kwargs: Any) -> Any:
        """Run the backbone; ``groups`` gives each sample's group index (into ``self.groups``)."""
        self.router.calls = 0
        try:
            out = self._forward(args, groups, kwargs)
        finally:  # the routing is this call's: a later call of the backbone alone must not reuse it
            self.router.parts = []
        if self.branch_stages and not self.router.calls and not self._said_bypassed:
            self._said_bypassed = True
            warnings.warn(
                f"{type(self.backbone).__name__}'s forward ran none of its branch stages "
                f"{list(self.branch_stages)}: it must call each stage through its attribute "
                "(self.stem(x)), or the groups' branches never run nor train",
                stacklevel=2,
            )
        return out

    def _forward(
        self, args: tuple[Any, ...], groups: Tensor | Sequence[int] | None, kwargs: dict[str, Any]
    ) -> Any:
        ids = self._group_ids(groups, args, kwargs)
        by_policy: dict[Participation, list[int]] = {}
        for g in torch.unique(ids).tolist():
            by_policy.setdefault(self.participation[self.groups[g]], []).append(g)
        if self._fuses(by_policy, args, kwargs, len(ids)):
            try:
                return self._run_fused(ids, by_policy[Participation.LIVE], args, kwargs)
            except rowgrad.NotFusable as err:
                self._unfusable, self._said_unfusable = str(err), True
                warnings.warn(f"live and detached groups run as separate calls: {err}", stacklevel=2)
        if len(by_policy) == 1:
            (policy,) = by_policy
            parts: list[tuple[Participation, Tensor | None]] = [(policy, None)]
        else:
            device = rows.first_device(args, kwargs)
            parts = [
                (policy, torch.nonzero(torch.isin(ids, torch.tensor(gs))).flatten().to(device))
                for policy, gs in by_policy.items()
            ]
        index_of = {p: (ix.cpu() if ix is not None else None) for p, ix in parts}

        def call(policy: Participation, *a: Any, **k: Any) -> Any:
            index = index_of[policy]
            sub_ids = ids if index is None else ids.index_select(0, index)
            self.router.set(sub_ids, rows.first_device(a, k))
            return self._run(policy, a, k)

        return rows.run_parts(parts, args, kwargs, call)

    def _fuses(
        self, by_policy: Mapping[Participation, list[int]], args: Any, kwargs: Any, batch: int
    ) -> bool:
        """Whether this batch runs as one call (``fused``; live and detached groups, gradients on)."""
        if not self.fused or set(by_policy) != _FUSABLE:
            return False
        if self._unfusable is not None:
            if self.fused is True and not self._said_unfusable:  # asked for, and cannot: say so once
                self._said_unfusable = True
                warnings.warn(
                    f"fused = True: live and detached groups run as separate calls: {self._unfusable}",
                    stacklevel=3,
                )
            return False
        if not torch.is_grad_enabled():
            return False
        return self.fused is True or batching.small_or_on_accelerator(
            (args, kwargs), batch, FUSE_AUTO_MAX_BYTES
        )

    def _run_fused(
        self, ids: Tensor, live_groups: list[int], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Live and detached rows as one call, live rows first (:class:`branchadapt.rowgrad.LiveRows`)."""
        is_live = torch.isin(ids, torch.tensor(live_groups))
        order = torch.cat((torch.nonzero(is_live).flatten(), torch.nonzero(~is_live).flatten()))
        device = rows.first_device(args, kwargs)
        batch = len(ids)
        moved = order.to(device)
        sub_args, sub_kwargs = rows.select_rows(args, moved, batch), rows.select_rows(kwargs, moved, batch)
        self.router.set(ids.index_select(0, order), device)
        with rowgrad.LiveRows(self.shared_parameters(), rows=batch, live=int(is_live.sum())):
            out = self.backbone(*sub_args, **sub_kwargs)
        return rows.merge_rows([out], order)

    def _run(self, policy: Participation, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if policy is Participation.LIVE:
            return self.backbone(*args, **kwargs)
        detached = {n: p.detach() for n, p in self._shared.items()}
        if policy is Participation.DETACHED:
            # shared statistics (e.g. BatchNorm running means) are shared state too: a detached group
            # normalises with its batch statistics but its updates land in throw-away copies
            buffers = dict(self.backbone.named_buffers())
            detached.update({n: buffers[n].clone() for n in self._shared_buffers})
            return functional_call(self.backbone, detached, args, kwargs, strict=False)
        modes = [m.training for m in self._shared_modules]
        for m in self._shared_modules:
            m.training = False
        try:
            return functional_call(self.backbone, detached, args, kwargs, strict=False)
        finally:
            for m, mode in zip(self._shared_modules, modes, strict=True):
                m.training = mode

    def _group_ids(self, groups: Tensor | Sequence[int] | None, args: Any, kwargs: Any) -> Tensor:
        if groups is None:
            if len(self.groups) == 1 or (
                not self.branch_stages and len(set(self.participation.values())) == 1
            ):
                return torch.zeros(rows.batch_size(args, kwargs), dtype=torch.long)
            raise ValueError("this model has per-group branches: pass groups=<group index per sample>")
        if isinstance(groups, Sequence) and groups and all(isinstance(g, str) for g in groups):
            unknown = sorted({str(g) for g in groups} - set(self.groups))
            if unknown:
                raise ValueError(f"groups names {unknown} are not groups of this model {list(self.groups)}")
            groups = [self.groups.index(str(g)) for g in groups]  # names: their indices
        given = torch.as_tensor(groups)
        if given.numel() == 0:  # torch.as_tensor([]) is float
            given = given.to(torch.long)
        if given.is_floating_point() or given.is_complex() or given.dtype == torch.bool or given.dim() != 1:
            raise ValueError(
                f"groups must be a 1-d sequence of integer group indices, got {given.dtype} of shape "
                f"{tuple(given.shape)} (group names work too: {list(self.groups)})"
            )
        ids = given.to(torch.long).cpu()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(self.groups)):
            raise ValueError(f"group ids must be in [0, {len(self.groups)}), got {ids.tolist()}")
        n = rows.batch_size(args, kwargs)
        if len(ids) != n:
            raise ValueError(f"groups has {len(ids)} entries for a batch of {n} rows; expected one per row")
        return ids

    # ------------------------------------------------------------------ parameters
    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters outside the branch stages: one set that every group runs through, and
        that only live groups' losses update."""
        return iter(self._shared.tensors())

    def _known(self, group: str) -> None:
        if group not in self.groups:
            raise UserError(f"unknown group {group!r}; this model's groups are {list(self.groups)}")

    def branch_parameters(self, group: str | None = None) -> Iterator[nn.Parameter]:
        """The per-group copies' parameters: every group's, or ``group``'s alone."""
        if group is not None:
            self._known(group)
        for path in self.branch_paths:
            router = self.backbone.get_submodule(path)
            assert isinstance(router, GroupBranches)
            for g, module in router.branches.items():
                if group is None or g == group:
                    yield from module.parameters()

    # ------------------------------------------------------------------ state
    def single_key(self, key: str, group: str) -> str | None:
        """Map a key of this model to the plain-backbone key for ``group`` (None: other group's)."""
        for path in self.branch_paths:
            head = f"backbone.{path}.{BRANCHES}."
            if key.startswith(head):
                g, _, rest = key[len(head) :].partition(".")
                return f"backbone.{path}.{rest}" if g == group else None
        return key

    def group_state_dict(self, group: str) -> dict[str, Tensor]:
        """The plain (unbranched) backbone state for ``group``, keys prefixed ``backbone.``."""
        self._known(group)
        out = {}
        for key, value in self.state_dict().items():
            mapped = self.single_key(key, group)
            if mapped is not None:
                out[mapped] = value
        return out

    def anchor_form(self, state: Mapping[str, Tensor], anchor: str) -> dict[str, Tensor]:
        """Reduce a state dict of *this* layout to plain form using ``anchor``'s branches."""
        return {m: v for k, v in state.items() if (m := self.single_key(k, anchor)) is not None}

    def load_flexible(self, state: Mapping[str, Tensor], anchor: str, source: str = "state") -> None:
        """Load a state of the same layout, a plain one (every group's branch starts from it), or
        one of another split depth or group set: a branch the state has for the same stage and
        group is kept, every other branch starts from the anchor's weights. Keys may be this
        module's (``backbone.<key>``) or the backbone's own (``<key>``, an unwrapped backbone's
        ``state_dict()``)."""
        self._known(anchor)
        if state and not any(k.startswith("backbone.") for k in state):
            state = {f"backbone.{k}": v for k, v in state.items()}
        own = self.state_dict()
        if set(state) == set(own):
            check_shapes(own, state, source)
            self.load_state_dict(state)
            return
        plain = plain_from_any(state, anchor)  # another split depth: go through the anchor
        wanted = {}
        for key in own:
            single = key
            for path in self.branch_paths:
                head = f"backbone.{path}.{BRANCHES}."
                if key.startswith(head):
                    single = f"backbone.{path}.{key[len(head) :].partition('.')[2]}"
            wanted[key] = single
        missing = sorted({s for s in wanted.values() if s not in plain})
        unexpected = sorted(set(plain) - set(wanted.values()))
        if missing or unexpected:
            raise CheckpointError(diff_message(source, missing, unexpected, []))
        # the same stage's branch of a group the state has (another group set): the group's own
        mapped = {k: state[k] if k != s and k in state else plain[s] for k, s in wanted.items()}
        check_shapes(own, mapped, source)
        self.load_state_dict(mapped)

    def extract(self, group: str) -> Backbone:
        """A plain backbone carrying ``group``'s branches: the group's own single model."""
        self._known(group)
        clone = copy.deepcopy(self.backbone)
        for path in self.branch_paths:
            router = clone.get_submodule(path)
            assert isinstance(router, GroupBranches)
            _set_submodule(clone, path, router.branches[group])
        return clone


def _modules_outside(root: nn.Module, stop: set[int]) -> Iterator[nn.Module]:
    if id(root) in stop:
        return
    yield root
    for child in root.children():
        yield from _modules_outside(child, stop)
