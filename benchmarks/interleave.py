"""The order in which a benchmark runs its configurations: every round runs each once, and every
other round runs them in reverse, so that drift in the machine's speed hits all of them alike."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")


def rounds_order(items: Sequence[T], rounds: int) -> Iterator[T]:
    """``items`` once per round, reversed in every odd round: ``ab``, 3 rounds -> ``a b b a a b``."""
    for r in range(rounds):
        yield from (reversed(items) if r % 2 else items)
