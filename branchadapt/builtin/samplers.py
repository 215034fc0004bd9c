"""Generic samplers. Plans are pure functions of (seed, step): an epoch-wise permutation per
(group, stream), so resumed runs and sharded ranks see exactly the samples they would have.
"""

from __future__ import annotations

import zlib
from functools import lru_cache

import numpy as np
from pydantic import Field

from ..interfaces import GroupSampler, PluginOptions


@lru_cache(maxsize=256)
def _permutation(seed: int, key: str, epoch: int, n: int) -> tuple[int, ...]:
    rng = np.random.default_rng([seed, zlib.crc32(key.encode()), epoch])
    return tuple(int(i) for i in rng.permutation(n))


def draw(seed: int, key: str, n: int, start: int, count: int) -> list[int]:
    """Items ``start .. start+count`` of an endless sequence of fresh permutations of ``range(n)``."""
    out = []
    for pos in range(start, start + count):
        epoch, offset = divmod(pos, n)
        out.append(_permutation(seed, key, epoch, n)[offset])
    return out


class PerGroupOptions(PluginOptions):
    per_group: int = Field(1, ge=1, description="items of every group (and stream) in each step")


class PerGroupSampler(GroupSampler):
    """The paper's batch: a fixed number of items from every group, forwarded together."""

    Options = PerGroupOptions
    options: PerGroupOptions

    def plan(self, step: int) -> dict[str, list[tuple[str, int]]]:
        k = self.options.per_group
        out: dict[str, list[tuple[str, int]]] = {}
        for group, streams in self.sizes.items():
            for stream, n in streams.items():
                if n > 0:
                    picks = draw(self.seed, f"{group}/{stream}", n, step * k, k)
                    out.setdefault(stream, []).extend((group, i) for i in picks)
        return out


class MixedOptions(PluginOptions):
    batch_size: int = Field(4, ge=1, description="items per stream per step, drawn from all groups pooled")


class MixedSampler(GroupSampler):
    """Ignores group balance: items drawn uniformly from the pooled groups (baseline batches)."""

    Options = MixedOptions
    options: MixedOptions

    def plan(self, step: int) -> dict[str, list[tuple[str, int]]]:
        k = self.options.batch_size
        pools: dict[str, list[tuple[str, int]]] = {}
        for group, streams in self.sizes.items():
            for stream, n in streams.items():
                pools.setdefault(stream, []).extend((group, i) for i in range(n))
        return {
            stream: [pool[i] for i in draw(self.seed, f"mixed/{stream}", len(pool), step * k, k)]
            for stream, pool in pools.items()
            if pool
        }
