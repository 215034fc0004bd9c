"""A backbone's stage names, checked before anything is branched by them.

``Backbone.stage_names`` is plugin code: a name that is no sub-module, a name listed twice or two
stages nested in each other is one message naming the backbone and the stage, not an
``AttributeError`` from deep inside the branching (or, for an unused name, nothing at all).
"""

from __future__ import annotations

from .errors import UserError
from .interfaces import Backbone

__all__ = ["check_stage_names"]


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
            if module is backbone:  # the path "" (a parameter is refused by get_submodule)
                raise UserError(f"{kind} stage {stage!r}: {path!r} is not a sub-module of the backbone")
            for other, by in owner.items():
                if path == other or path.startswith(other + ".") or other.startswith(path + "."):
                    raise UserError(
                        f"{kind} stages {by!r} and {stage!r} overlap ({other!r} and {path!r}); "
                        "expected stages that are disjoint sub-modules"
                    )
            owner[path] = stage
    return names
