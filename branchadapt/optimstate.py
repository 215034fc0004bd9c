"""Optimiser state in a checkpoint: its tensors for ``state.safetensors`` and the rest (steps,
parameter groups, hyper-parameters) as JSON for ``meta.json``, checked against the live
optimisers before any is changed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .errors import CheckpointError

IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable", "differentiable")


def optimizer_state(
    optimizers: Mapping[str, torch.optim.Optimizer],
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split optimiser state into tensors (safetensors) and plain values (JSON)."""
    tensors: dict[str, Tensor] = {}
    meta: dict[str, Any] = {}
    for name, opt in optimizers.items():
        sd = opt.state_dict()
        plain: dict[str, dict[str, Any]] = {}
        for pid, slots in sd["state"].items():
            for slot, value in slots.items():
                if isinstance(value, Tensor):
                    tensors[f"{name}.{pid}.{slot}"] = value.detach().to("cpu", copy=True).contiguous()
                else:
                    plain.setdefault(str(pid), {})[slot] = value
        meta[name] = {"type": type(opt).__name__, "param_groups": sd["param_groups"], "plain": plain}
    return tensors, meta


def load_optimizer_state(
    optimizers: Mapping[str, torch.optim.Optimizer], tensors: Mapping[str, Tensor], meta: Mapping[str, Any]
) -> None:
    """Load saved optimiser state into ``optimizers``; every phase is checked before any is changed."""
    for name, state in checked_optimizer_states(optimizers, tensors, meta).items():
        optimizers[name].load_state_dict(state)


def checked_optimizer_states(
    optimizers: Mapping[str, torch.optim.Optimizer], tensors: Mapping[str, Tensor], meta: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """Each phase's saved state dict, once it is for this phase's optimiser type and parameters."""
    out: dict[str, dict[str, Any]] = {}
    for name, opt in optimizers.items():
        if name not in meta:
            raise CheckpointError(f"checkpoint has no optimiser state for phase {name!r}")
        saved = meta[name].get("type")  # (absent from checkpoints written before it was recorded)
        if saved is not None and saved != type(opt).__name__:
            raise CheckpointError(
                f"optimiser state of phase {name!r} is {saved}'s, this run's optimiser is {type(opt).__name__}"
            )
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            owner, pid, slot = key.split(".", 2)
            if owner == name:
                state.setdefault(int(pid), {})[slot] = value
        for pid, slots in meta[name]["plain"].items():
            state.setdefault(int(pid), {}).update(slots)
        groups = meta[name]["param_groups"]
        for group, live in zip(groups, opt.param_groups, strict=False):  # count: checked below
            if "betas" in group:
                group["betas"] = tuple(group["betas"])
            # the kernels are this run's choice (device, train.fused_optimizers), not the checkpoint's
            group.update({k: live[k] for k in IMPLEMENTATION_KEYS if k in live})
        saved_sizes = [len(g["params"]) for g in groups]
        live_sizes = [len(g["params"]) for g in opt.param_groups]
        if saved_sizes != live_sizes:  # what torch's load_state_dict would refuse, checked first
            raise CheckpointError(
                f"optimiser state of phase {name!r} does not match the model: parameter groups of "
                f"{saved_sizes} parameters saved, this run's optimiser has {live_sizes}"
            )
        out[name] = {"state": state, "param_groups": groups}
    return out
