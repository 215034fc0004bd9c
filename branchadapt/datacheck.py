"""Read every item of an experiment's data once, before hours of training sample it.

Building a data source checks what is cheap to check (folders, file headers); an item that is
damaged further in fails only when it is read. ``branchadapt validate --data`` reads them all and
lists every one that cannot be used, so that a run does not stop on its first bad item hours in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .errors import UserError
from .loading import ResolvedExperiment


@dataclass
class DataReport:
    """What reading every item of one split found."""

    split: str
    #: group -> stream -> items read
    sizes: dict[str, dict[str, int]]
    #: one user error message per item that could not be read
    problems: list[str] = field(default_factory=list)

    @property
    def items(self) -> int:
        return sum(n for streams in self.sizes.values() for n in streams.values())


def check_data(
    exp: ResolvedExperiment, split: str = "train", advance: Callable[[int, int], None] | None = None
) -> DataReport:
    """Read every item of ``split`` for the experiment's groups through its data source's ``get``.

    A :class:`UserError` from one item (a damaged file, say) is recorded and the rest are still
    read; any other exception is a bug in the source and propagates. ``advance(done, total)`` is
    called after each item (progress output).
    """
    data = exp.data
    source = data.cls(data.options, tuple(exp.spec.groups), exp.base_dir, split)
    sizes = source.sizes()
    report = DataReport(split, sizes)
    total, done = report.items, 0
    rng = np.random.default_rng(exp.spec.seed)
    for group, streams in sizes.items():
        for stream, count in streams.items():
            for index in range(count):
                try:
                    source.get(group, stream, index, rng)
                except UserError as exc:
                    report.problems.append(str(exc))
                done += 1
                if advance is not None:
                    advance(done, total)
    return report
