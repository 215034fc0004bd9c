"""Multi-process training on ``torch.distributed``, launched by ``torchrun``.

``torchrun --nproc-per-node N -m branchadapt run EXP.toml`` (one machine) or ``torchrun --nnodes M
--nproc-per-node N --rdzv-backend c10d --rdzv-endpoint HOST:PORT -m branchadapt run EXP.toml`` (several)
sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; :func:`setup` then joins the process group (NCCL on
CUDA, gloo on CPU). Semantics, identical to data-parallel training on one process with the same
global batch:

- the sampler plans the *global* batch; rank ``r`` of ``N`` takes every ``N``-th item of it from
  ``r`` on (:func:`shard`), so every group's items are spread over the ranks;
- every module with trainable parameters is wrapped in ``DistributedDataParallel``
  (:func:`wrap_ddp`) for the task's forward passes, and every rank starts from rank 0's
  parameters and buffers (DDP copies them for the wrapped modules, :func:`wrap_ddp` for the
  rest); the reducer all-reduces the gradients in buckets during each phase's backward, so the optimiser step sees the gradient of the global
  batch. ``find_unused_parameters`` is on: a parameter that has no gradient on some rank (its
  group's items are elsewhere, or only detached groups used it) takes part with zeros, and one
  that has none on any rank keeps ``grad = None``, as on one process. Selective back-propagation
  needs nothing more: detached groups run the shared stages on detached views, so no rank ever
  produces a gradient for them from those groups;
- rank 0 alone writes the run directory (config, metrics, checkpoints, samples, reports); the
  others wait at a barrier where the files must exist. Checkpoints do not depend on the number of
  processes, so a run checkpointed under N processes resumes under any other number.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .errors import UserError


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job (``world == 1``: a plain single-process run)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env(environ: Mapping[str, str] | None = None) -> DistInfo:
    """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` as set by ``torchrun`` (defaults: one process)."""
    env = os.environ if environ is None else environ
    try:
        return DistInfo(
            rank=int(env.get("RANK", "0")),
            world=int(env.get("WORLD_SIZE", "1")),
            local_rank=int(env.get("LOCAL_RANK", "0")),
        )
    except ValueError as exc:
        raise UserError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers ({exc})") from exc


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA tensors, gloo for everything else."""
    return "nccl" if device.type == "cuda" else "gloo"


def setup(device: torch.device) -> DistInfo:
    """Join the process group when launched by ``torchrun`` with more than one process."""
    info = from_env()
    if not info.enabled:
        return info
    if device.type == "cuda":
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend_for(device))
    if dist.get_world_size() != info.world:
        raise UserError(f"WORLD_SIZE={info.world} but the process group has {dist.get_world_size()} ranks")
    return info


def local_device(device: torch.device, info: DistInfo) -> torch.device:
    """One GPU per process: ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun."""
    if device.type == "cuda" and info.enabled and device.index is None:
        return torch.device("cuda", info.local_rank)
    return device


def shard(
    plan: Mapping[str, Sequence[tuple[str, int]]], rank: int, world: int, step: int | None = None
) -> dict[str, list[tuple[str, int]]]:
    """Rank ``rank``'s part of a global plan: items ``rank, rank + world, ...`` of every stream.

    Plans list a group's items together, so with ``per_group = k`` (k a multiple of ``world``)
    every rank gets ``k / world`` items of every group. A stream whose item count is not a
    multiple of ``world`` would give ranks unequal batches (and a gradient average that differs
    from the one-process mean), so it is refused.
    """
    if world == 1:
        return {s: list(p) for s, p in plan.items()}
    uneven = uneven_stream(plan, world)
    if uneven is not None:
        at = f" at step {step}" if step is not None else ""
        raise UserError(
            f"sampler: the global batch of stream {uneven[0]!r}{at} has {uneven[1]} items, not a "
            f"multiple of the {world} processes; make the sampler's batch (e.g. "
            f"sampler.per_group or sampler.batch_size) a multiple of {world}"
        )
    return {stream: list(picks[rank::world]) for stream, picks in plan.items()}


def uneven_stream(plan: Mapping[str, Sequence[tuple[str, int]]], world: int) -> tuple[str, int] | None:
    """The first stream of a global plan whose item count ``world`` processes cannot share
    evenly, with that count; None when every stream splits."""
    return next(((s, len(p)) for s, p in plan.items() if len(p) % world), None)


def wrap_ddp(modules: Mapping[str, nn.Module], device: torch.device) -> dict[str, nn.Module]:
    """The modules as the task's forward should call them: each one with trainable parameters
    wrapped in ``DistributedDataParallel`` when a process group is active, the rest unchanged.

    Every rank leaves with rank 0's parameters and buffers. The wrappers share their parameters
    with the modules, so optimisers, checkpoints and the task's own hooks keep using the plain
    modules."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(modules)
    ids = [device.index if device.index is not None else 0] if device.type == "cuda" else None
    out: dict[str, nn.Module] = {}
    for name, module in modules.items():
        if any(p.requires_grad for p in module.parameters()):  # DDP broadcasts rank 0's state itself
            out[name] = nn.parallel.DistributedDataParallel(
                module, device_ids=ids, find_unused_parameters=True
            )
        else:
            with torch.no_grad():
                for tensor in [*module.parameters(), *module.buffers()]:
                    dist.broadcast(tensor.data, 0)
            out[name] = module
    return out


def average_values(values: Mapping[str, float], world: int, device: torch.device) -> dict[str, float]:
    """Mean over ranks of scalar metrics with the same keys on every rank (for logs)."""
    if world == 1 or not values:
        return dict(values)
    keys = sorted(values)  # one order on every rank for the reduction
    flat = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(flat)
    mean = {k: float(v) / world for k, v in zip(keys, flat.tolist(), strict=True)}
    return {k: mean[k] for k in values}  # the caller's order, as a one-process run logs them


def all_finite(value: torch.Tensor, info: DistInfo) -> bool:
    """Whether ``value`` is finite on every rank (so that all ranks raise, or none)."""
    finite = bool(torch.isfinite(value).all())
    if not info.enabled:
        return finite
    flag = torch.tensor([0.0 if finite else 1.0], device=value.device)
    dist.all_reduce(flag)
    return float(flag) == 0.0


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op on one process)."""
    if info.enabled and dist.is_initialized():
        dist.barrier()


def teardown(info: DistInfo, failed: bool = False) -> None:
    """Leave the process group (end of ``branchadapt run``). A rank that ``failed`` leaves
    without waiting for the others, which may be blocked in a step's collective: it exits, and
    torchrun then stops the whole job instead of every rank waiting for the rest."""
    if info.enabled and dist.is_initialized():
        gc.collect()  # finished stages' DDP reducers go before the process group they use
        if not failed:
            dist.barrier()
        dist.destroy_process_group()
