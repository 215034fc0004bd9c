"""Start from photo2cartoon weights: map its checkpoint keys to ours, load strictly, report clearly.

Accepted files (read with ``torch.load(weights_only=True)``, never unpickled otherwise): the
inference file (``{"genA2B": state}``), a training checkpoint (``genA2B``, ``genB2A``, ``disGA``,
``disGB``, ``disLA``, ``disLB``) or a bare generator state dict. Our names equal theirs except the
generator's CAM pieces, grouped under ``cam.`` (``cam.gap_fc.weight`` <- ``gap_fc.weight``).
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from branchadapt import CheckpointError, UserError

CAM_PARTS = ("gap_fc.", "gmp_fc.", "conv1x1.")
#: our module name -> the reference checkpoint's entry
MODULE_KEYS = {"gen_a2b": "genA2B", "gen_b2a": "genB2A", "dis_ga": "disGA", "dis_gb": "disGB",
               "dis_la": "disLA", "dis_lb": "disLB"}  # fmt: skip


def reference_key(key: str) -> str:
    """Our generator key -> photo2cartoon's."""
    return key[len("cam.") :] if key.startswith("cam.") else key


def our_key(key: str) -> str:
    """photo2cartoon's generator key -> ours."""
    return f"cam.{key}" if key.startswith(CAM_PARTS) else key


def read_checkpoint(path: Path) -> dict[str, dict[str, Tensor]]:
    """The state dicts in a photo2cartoon file, by its entry names (a bare state dict: ``genA2B``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: photo2cartoon checkpoint not found")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt/unsafe files
        if isinstance(exc, pickle.UnpicklingError) and "Unsupported global" in str(exc):
            raise UserError(  # a pickle of Python objects: torch's safe loader refuses what it names
                f"{path}: holds Python objects besides tensors, which branchadapt does not unpickle "
                "(torch's weights_only loader refused it); expected photo2cartoon's .pt file of state "
                "dicts (save the modules' state_dict()s alone)"
            ) from None
        first = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()[0][:200] if str(exc) else ""
        raise UserError(
            f"{path}: not a photo2cartoon checkpoint torch can load safely ({type(exc).__name__}: {first}); "
            "expected photo2cartoon's .pt file of state dicts"
        ) from None
    if not isinstance(data, Mapping):
        raise UserError(f"{path}: expected a dict of state dicts, got {type(data).__name__}")
    if all(isinstance(v, Tensor) for v in data.values()):
        return {"genA2B": dict(data)}
    found = {k: dict(v) for k, v in data.items() if isinstance(v, Mapping) and k in MODULE_KEYS.values()}
    if not found:
        raise UserError(
            f"{path}: none of {sorted(MODULE_KEYS.values())} in the file (keys: {sorted(data)[:8]})"
        )
    return found


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:6]) + (f" ... ({len(keys)} in all)" if len(keys) > 6 else "")


def load_into(module: nn.Module, state: Mapping[str, Tensor], where: str, generator: bool) -> list[str]:
    """Load ``state`` (reference names) into ``module``; keys only we have are returned, the rest is strict.

    ``module`` may be branched: a plain module is expected here (the first stage builds plain ones).
    """
    mapped = {our_key(k) if generator else k: v for k, v in state.items()}
    own = module.state_dict()
    missing = sorted(set(own) - set(mapped))
    unexpected = sorted(set(mapped) - set(own))
    optional = [k for k in missing if k.startswith("group_head.")]  # our addition: keeps its init
    missing = [k for k in missing if k not in optional]
    shapes = [f"{k} (file {tuple(mapped[k].shape)} vs model {tuple(v.shape)})"
              for k, v in own.items() if k in mapped and mapped[k].shape != v.shape]  # fmt: skip
    if missing or unexpected or shapes:
        lines = [f"{where} does not match the model:"]
        if missing:
            lines.append(f"  missing keys: {_few([reference_key(k) if generator else k for k in missing])}")
        if unexpected:
            lines.append(
                f"  unexpected keys: {_few([reference_key(k) if generator else k for k in unexpected])}"
            )
        if shapes:
            lines.append(f"  shape mismatch: {_few(shapes)}")
        lines.append("  (check the model width / image size / light options against the checkpoint)")
        raise CheckpointError("\n".join(lines))
    module.load_state_dict({**own, **{k: mapped[k] for k in own if k in mapped}})
    return optional


def import_weights(path: Path, modules: Mapping[str, nn.Module]) -> list[str]:
    """Initialise the translator's modules from a photo2cartoon file; returns what was loaded."""
    entries = read_checkpoint(path)
    loaded = []
    for name, module in modules.items():
        entry = MODULE_KEYS.get(name)
        if entry in entries:
            target = getattr(module, "backbone", module)  # a branched generator wraps the plain one
            load_into(target, entries[entry], f"{path} [{entry}]", generator=name.startswith("gen"))
            loaded.append(name)
    if not loaded:
        raise UserError(f"{path}: no entry matches the translator's modules {sorted(modules)}")
    return loaded
