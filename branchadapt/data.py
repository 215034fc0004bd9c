"""From a sampler's plan to a batch on the device.

``StepData`` maps a step number to its collated batch, so a plain ``DataLoader`` over the range
of remaining steps gives worker processes, prefetching and exact resumption for free. Every item
gets its own RNG derived from (seed, stage, step, stream, slot in the global batch): augmentation is
reproducible whatever the number of workers.
"""

from __future__ import annotations

import operator
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .distributed import shard
from .errors import UserError
from .interfaces import Batch, DataSource, GroupSampler


class StepData(Dataset[Batch]):
    """Indexable by step: the sampler's plan for that step, fetched and collated per stream."""

    def __init__(
        self,
        source: DataSource,
        sampler: GroupSampler,
        groups: Sequence[str],
        seed: int,
        stage: int = 0,
        rank: int = 0,
        world: int = 1,
        label: str | None = None,
    ) -> None:
        self.source = source
        self.rank, self.world = rank, world
        self.sampler = sampler
        #: how messages name the sampler (the trainer: its file and key)
        self.label = label or f"sampler {type(sampler).__name__}"
        sizes = getattr(sampler, "sizes", None)
        if not isinstance(sizes, dict):  # a sampler that did not call GroupSampler.__init__
            every = source.sizes()
            sizes = {g: every.get(g, {}) for g in groups}
        self.sizes: dict[str, dict[str, int]] = sizes
        self.group_index = {g: i for i, g in enumerate(groups)}
        self.seed = seed
        self.stage = stage

    def __len__(self) -> int:  # steps are unbounded; the loader's sampler bounds them
        return 2**62

    def plan(self, step: int) -> dict[str, list[tuple[str, int]]]:
        """This rank's (group, index) picks of every stream at ``step``."""
        plan = self.sampler.plan(step)
        check_plan(plan, self.sizes, step, self.label)
        return shard(plan, self.rank, self.world, step)

    def describe(self, step: int) -> list[str]:
        """The data source's names of this rank's items at ``step`` (for messages)."""
        return [
            self.source.describe(g, stream, i) for stream, picks in self.plan(step).items() for g, i in picks
        ]

    def __getitem__(self, step: int) -> Batch:
        batch: Batch = {}
        # under torchrun the sampler plans the global batch and this rank takes its shard
        for stream, picks in self.plan(step).items():
            key = zlib.crc32(stream.encode())
            items = [
                self.source.get(
                    group,
                    stream,
                    index,
                    np.random.default_rng([self.seed, self.stage, step, key, self.rank + self.world * slot]),
                )
                for slot, (group, index) in enumerate(picks)
            ]
            collated = dict(self.source.collate(stream, items))
            collated["group"] = torch.tensor([self.group_index[g] for g, _ in picks], dtype=torch.long)
            batch[stream] = collated
        return batch


def _listlike(value: Any) -> bool:
    """An ordered sequence of items: a list, a tuple, or an array or tensor of at least one
    dimension (a set's order would change the batch from run to run)."""
    if isinstance(value, list | tuple):
        return True
    return isinstance(value, np.ndarray | Tensor) and value.ndim >= 1


def check_plan(plan: Any, sizes: Mapping[str, Mapping[str, int]], step: int, label: str) -> None:
    """A user error naming ``label`` unless ``plan`` (a sampler's ``plan(step)``) maps streams to
    non-empty lists of (group, index), each group one of ``sizes``' and each index an integer
    (anything ``operator.index`` takes: numpy integers, 0-d integer tensors) in its stream."""
    at = f"{label}: plan({step})"
    if not isinstance(plan, Mapping) or not plan:
        raise UserError(f"{at} returned {plan!r}; expected a dict stream -> [(group, index), ...], not empty")
    for stream, picks in plan.items():
        if not _listlike(picks) or not len(picks):
            raise UserError(
                f"{at} gives stream {stream!r} {picks!r}; expected a non-empty list of (group, index)"
            )
        for pick in picks:
            group, index = pick if _listlike(pick) and len(pick) == 2 else (None, None)
            if not isinstance(group, str) or group not in sizes:
                raise UserError(f"{at} picks {pick!r}; expected (group, index) with a group of {list(sizes)}")
            n = sizes[group].get(stream, 0)
            if not n:
                have = sorted(s for s, k in sizes[group].items() if k)
                raise UserError(
                    f"{at} picks {pick!r} from stream {stream!r}, in which group {group!r} has no items "
                    f"(its streams: {have})"
                )
            boolean = isinstance(index, bool | np.bool_) or (
                isinstance(index, Tensor) and index.dtype == torch.bool
            )
            try:
                position = None if index is None or boolean else operator.index(index)
            except TypeError:
                position = None
            if position is None:
                raise UserError(
                    f"{at} picks {pick!r}: the index is not an integer; expected 0 <= index < {n}"
                )
            if not 0 <= position < n:
                raise UserError(
                    f"{at} picks {pick!r}: index out of range; group {group!r} has {n} items in stream "
                    f"{stream!r}, so expected 0 <= index < {n}"
                )


class _Guarded(Dataset[Batch | UserError]):
    """Returns a worker's user error as a value: the loader would re-raise it wrapped in the
    worker's traceback, and the user should see only its message."""

    def __init__(self, data: StepData) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, step: int) -> Batch | UserError:
        try:
            return self.data[step]
        except UserError as exc:
            return exc


def _unwrapped(batches: Iterator[Batch | UserError]) -> Iterator[Batch]:
    for batch in batches:
        if isinstance(batch, UserError):
            raise batch
        yield batch


def step_batches(data: StepData, start: int, stop: int, workers: int = 0) -> Iterator[Batch]:
    """Batches for steps ``start .. stop-1``, in order, optionally from worker processes. A
    :class:`UserError` in a worker (a file that cannot be read, say) is raised here as itself."""
    if workers == 0:
        return (data[s] for s in range(start, stop))
    loader = DataLoader(
        _Guarded(data),
        batch_size=None,
        sampler=range(start, stop),
        num_workers=workers,
        prefetch_factor=4,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )
    return _unwrapped(iter(loader))


def to_device(batch: Batch, device: torch.device) -> Batch:
    """``batch`` (stream -> field -> value) with every tensor moved to ``device``, without blocking."""

    def move(v: Any) -> Any:
        return v.to(device, non_blocking=True) if isinstance(v, Tensor) else v

    return {stream: {k: move(v) for k, v in fields.items()} for stream, fields in batch.items()}


def group_batches(
    source: DataSource, group: str, stream: str, group_index: int, batch_size: int = 64, seed: int = 0
) -> Iterator[dict[str, Tensor]]:
    """Every item of one group's stream, in order, collated in batches (for evaluation)."""
    n = source.sizes()[group].get(stream, 0)
    for start in range(0, n, batch_size):
        idx = range(start, min(n, start + batch_size))
        items = [source.get(group, stream, i, np.random.default_rng([seed, i])) for i in idx]
        batch = dict(source.collate(stream, items))
        batch["group"] = torch.full((len(items),), group_index, dtype=torch.long)
        yield batch


def first_input(
    source: DataSource, groups: Sequence[str], streams: Sequence[str], key: str, batch_size: int = 1
) -> Tensor | None:
    """Field ``key`` of the first item of the first of ``groups`` holding any of ``streams``,
    repeated ``batch_size`` times: an input shaped as the data makes it (None: no such item)."""
    sizes = source.sizes()
    for gi, group in enumerate(groups):
        for stream in streams:
            if sizes.get(group, {}).get(stream, 0):
                x = next(group_batches(source, group, stream, gi, batch_size=1))[key][:1]
                return x.expand(batch_size, *x.shape[1:]).contiguous()
    return None
