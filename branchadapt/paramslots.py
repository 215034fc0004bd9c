"""A module's named parameters without walking the module tree on every call.

``nn.Module.named_parameters()`` walks every sub-module in Python each time it is called. For a
backbone of several hundred sub-modules that is a few milliseconds, and the branched model needs
the shared parameters (and a stacked stage the copies' parameters) on every forward, several
times per training step. :class:`ParamSlots` resolves each name once to its owning module and
attribute; reading the current parameters is then one dict lookup each, and a parameter replaced
on its owner (``load_state_dict(assign=True)``, ``module.to`` with parameter overwriting) is still
seen. Replacing a *sub-module* after the slots were built is not: build new slots then.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from torch import nn


class ParamSlots:
    """The parameters of ``module`` (as ``named_parameters()`` names and orders them) that ``keep``
    accepts, read from their owning modules."""

    def __init__(self, module: nn.Module, keep: Callable[[str], bool] | None = None) -> None:
        self.names: list[str] = []
        self._slots: list[tuple[dict[str, nn.Parameter | None], str]] = []
        for name, _ in module.named_parameters():
            if keep is not None and not keep(name):
                continue
            owner_path, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_path) if owner_path else module
            self.names.append(name)
            self._slots.append((owner._parameters, attr))

    def __len__(self) -> int:
        return len(self._slots)

    def tensors(self) -> list[nn.Parameter]:
        """The current parameters, in ``names`` order."""
        out = []
        for params, attr in self._slots:
            p = params[attr]
            assert p is not None, f"parameter {attr!r} was removed from its module"
            out.append(p)
        return out

    def items(self) -> Iterator[tuple[str, nn.Parameter]]:
        return zip(self.names, self.tensors(), strict=True)


__all__ = ["ParamSlots"]
