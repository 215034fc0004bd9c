"""Any timm model as a branchadapt ``Backbone``, cut into stages from timm's own feature metadata.

timm records where each feature level ends (``model.feature_info``: module paths such as
``act1``, ``layer1``, ``stages.0``, ``blocks.3``); :func:`discover_stages` turns them into logical
stages ``stem``, one per feature level, and ``head``, each a list of sibling sub-module paths (a
``stage_paths`` entry). Parameters held by the model itself, outside every sub-module (a ViT's
``pos_embed`` and ``cls_token``), belong to no stage and therefore always stay shared.
"""

from __future__ import annotations

import difflib
import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from branchadapt import Backbone, CheckpointError, PluginOptions, UserError
from branchadapt.checkpoint import read_state


class TimmOptions(PluginOptions):
    model: str = Field(description="timm model name, e.g. resnet10t, mobilenetv3_small_050, convnext_atto")
    num_classes: int = Field(ge=1, description="classifier outputs")
    in_chans: int = Field(3, ge=1, description="input channels")
    weights: Path | None = Field(
        None, description="local weights: a .safetensors file or a torch state dict (never downloaded)"
    )
    skip_classifier: bool = Field(
        False, description="keep the classifier randomly initialised (weights trained for other classes)"
    )
    cuts: list[str] | None = Field(
        None, description="module paths ending each feature stage (default: timm's feature_info)"
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="extra timm.create_model arguments, e.g. {channels = [32, 64]}"
    )


# ---------------------------------------------------------------------------- stage discovery
def feature_modules(model: nn.Module) -> list[str]:
    """Module paths timm reports as the ends of its feature levels, de-duplicated, in order."""
    info = getattr(model, "feature_info", None)
    if not info:
        return []
    entries = info.get_dicts() if hasattr(info, "get_dicts") else info
    out: list[str] = []
    for entry in entries:
        path = entry.get("module", "") if isinstance(entry, dict) else ""
        if path and path not in out:
            out.append(path)
    return out


def _units(model: nn.Module, features: Sequence[str]) -> list[str]:
    """The model's modules in registration order, opening every container that holds a feature."""
    ancestors = {".".join(f.split(".")[:i]) for f in features for i in range(1, f.count(".") + 1)}

    def walk(module: nn.Module, prefix: str) -> list[str]:
        found = []
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            found += walk(child, f"{path}.") if path in ancestors else [path]
        return found

    return walk(model, "")


def _has_state(model: nn.Module, path: str) -> bool:
    module = model.get_submodule(path)
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _split_stem(model: nn.Module, first: list[str], ends: list[str]) -> tuple[list[str], list[str]] | None:
    """Separate the stem from the first feature level when that level is a block of a container.

    E.g. a ViT's ``patch_embed`` from ``blocks.0``, an EfficientNet's ``conv_stem, bn1`` from
    ``blocks.0``, a TResNet's ``body.conv1`` from ``body.layer1`` (a block beside the next ones).
    """
    end = ends[0]
    if "." not in end or len(first) == 1:
        return None
    top = end.split(".")[0] + "."
    outside = [u for u in first if not u.startswith(top)]
    if outside and len(outside) < len(first):
        return outside, [u for u in first if u.startswith(top)]
    parent = end.rpartition(".")[0]
    block = any(any(True for _ in c.parameters()) for c in model.get_submodule(end).children())
    if block and len(ends) > 1 and ends[1].rpartition(".")[0] == parent:
        return first[:-1], [end]
    return None


def discover_stages(model: nn.Module, cuts: Sequence[str] | None = None) -> dict[str, list[str]]:
    """Ordered stage name -> sibling sub-module paths, cut after each feature module.

    The model's modules (containers of a feature level opened up) are listed in registration
    order and cut after every feature module. The first piece is ``stem`` (split in two when the
    first feature is a block inside a container: ``stem`` before the container, then the block),
    the following pieces are named by their feature module, the rest is ``head``. Leading
    parameter-free modules of a middle piece (a ResNet's max-pool) join the piece before, so the
    stem is conv + norm + act + pool as in the papers.
    """
    name = type(model).__name__
    if cuts is not None and not cuts:
        raise UserError("model.cuts is empty; name the module ending each stage, or leave it out")
    features = list(cuts) if cuts is not None else feature_modules(model)
    if not features:
        raise UserError(
            f"timm model {name} reports no feature_info; name its stage ends with model.cuts = [...]"
        )
    known = {n for n, _ in model.named_modules() if n}
    bad = [f for f in features if f not in known]
    if bad:
        where = "model.cuts" if cuts is not None else f"{name}.feature_info"
        raise UserError(
            f"{where} names {bad}, which are not sub-modules of {name}; give module paths ending each "
            f"stage with model.cuts = [...] (top-level modules: {[n for n, _ in model.named_children()]})"
        )
    units = _units(model, features)
    ends = [u for u in units if u in set(features)]
    if cuts is not None and list(cuts) != ends:  # a list the model's order would silently rewrite
        twice = sorted({c for c in cuts if list(cuts).count(c) > 1})
        problem = f"names {twice} more than once" if twice else "is not in the model's order"
        raise UserError(f"model.cuts {problem}; expected each stage end once, input side first: {ends}")
    pieces: list[list[str]] = []
    current: list[str] = []
    for unit in units:
        current.append(unit)
        if unit in ends:
            pieces.append(current)
            current = []
    split = _split_stem(model, pieces[0], ends)
    named = [("stem", pieces[0])] if split is None else [("stem", split[0]), (ends[0], split[1])]
    named += list(zip(ends[1:], pieces[1:], strict=True))
    for (_, before), (_, piece) in itertools.pairwise(named):
        while len(piece) > 1 and not _has_state(model, piece[0]):
            before.append(piece.pop(0))
    stages = dict(named)
    if current:
        stages["head" if "head" not in stages else "classifier"] = current
    return stages


# ---------------------------------------------------------------------------- weights
def load_state(path: Path) -> dict[str, Tensor]:
    """A state dict from safetensors or a torch file (``weights_only=True``: no pickled code runs)."""
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise UserError(f"model.weights: {path} {what}; expected a .safetensors or torch state-dict file")
    try:  # by the content: a torch file named .safetensors is still read
        state = read_state(path)
    except Exception as exc:
        raise UserError(f"model.weights: cannot read {path} ({type(exc).__name__}: {exc})") from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"model.weights: {path} holds no state dict (a mapping of names to tensors)")
    return state


#: prefixes of every key in files holding a timm model's state inside a wrapper: DataParallel or
#: DDP, a TimmBackbone's own state, ``branchadapt export --format safetensors`` of one
WRAPPER_PREFIXES = ("module.", "model.", "backbone.model.")


def unwrapped(state: dict[str, Tensor], own: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state`` without a wrapper's prefix, where its keys only match ``own``'s without it."""
    if not state or set(state) & set(own):
        return state
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            stripped = {k.removeprefix(prefix): v for k, v in state.items()}
            if set(stripped) & set(own):
                return stripped
    return state


def _few(keys: Sequence[str]) -> str:
    return ", ".join(keys[:5]) + (f" ... ({len(keys)} in all)" if len(keys) > 5 else "") if keys else "none"


def load_weights_into(model: nn.Module, path: Path, model_name: str, skip_classifier: bool) -> None:
    """Load ``path`` strictly; a mismatch names the missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    state = unwrapped(load_state(path), own)
    get_classifier = getattr(model, "get_classifier", None)
    classifier = get_classifier() if callable(get_classifier) else None
    prefixes = tuple(f"{n}." for n, m in model.named_modules() if m is classifier)
    if skip_classifier:
        state = {k: v for k, v in state.items() if not k.startswith(prefixes)}
        own = {k: v for k, v in own.items() if not k.startswith(prefixes)}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    mismatched = [k for k, v in own.items() if k in state and state[k].shape != v.shape]
    shapes = [f"{k} (file {tuple(state[k].shape)} vs model {tuple(own[k].shape)})" for k in mismatched]
    if missing or unexpected or shapes:
        other_classes = bool(prefixes) and any(k.startswith(prefixes) for k in mismatched)
        raise CheckpointError(
            f"model.weights: {path} does not match timm model {model_name!r}:\n"
            f"  missing keys: {_few(missing)}\n  unexpected keys: {_few(unexpected)}\n"
            f"  shape mismatch: {_few(shapes)}"
            + ("\n  (weights for other classes? set model.skip_classifier = true)" if other_classes else "")
        )
    model.load_state_dict(state, strict=not skip_classifier)


# ---------------------------------------------------------------------------- backbone
def create(options: TimmOptions) -> Any:  # a timm model: forward_features / forward_head are untyped
    """``timm.create_model`` without any download; unknown names list the closest timm names."""
    import timm  # here, not at the top: importing timm costs seconds and registering the plugin needs none

    if not timm.is_model(options.model):
        names = timm.list_models()
        close = difflib.get_close_matches(options.model, names, n=6, cutoff=0.5)
        raise UserError(
            f"model.model: {options.model!r} is not a timm model; closest: {', '.join(close) or 'none'} "
            "(timm.list_models() lists all)"
        )
    given = [k for k in ("pretrained", "checkpoint_path") if k in options.kwargs]
    if given:
        raise UserError(
            f"model.kwargs: {given[0]} is not allowed (nothing is downloaded, and weights are read "
            "from one place); give a local weights file with model.weights"
        )
    try:
        return timm.create_model(
            options.model,
            pretrained=False,
            num_classes=options.num_classes,
            in_chans=options.in_chans,
            **options.kwargs,
        )
    except (TypeError, ValueError, AssertionError) as exc:
        raise UserError(
            f"model.kwargs: timm cannot build {options.model!r} with {options.kwargs}: {exc}"
        ) from exc


class TimmBackbone(Backbone):
    """A timm classifier (``pretrained=False``) cut into stem / feature stages / head.

    ``forward(x)`` returns logits; ``forward(x, features=True)`` returns ``{"logits", "features"}``
    with the pooled pre-logit features (``forward_head(pre_logits=True)``) for alignment losses.
    """

    Options = TimmOptions
    options: TimmOptions
    #: only initial weights: a resume, a later stage, evaluate and export do not read the file
    initial_weights_options = ("weights",)

    def __init__(self, options: TimmOptions | None = None) -> None:
        super().__init__(options)
        o = self.options
        self.model = create(o)
        if o.weights is not None:
            load_weights_into(self.model, o.weights, o.model, o.skip_classifier)
        self._stages = discover_stages(self.model, o.cuts)

    def stage_names(self) -> list[str]:
        return list(self._stages)

    def stage_paths(self, stage: str) -> list[str]:
        return [f"model.{p}" for p in self._stages[stage]]

    def example_inputs(self, batch_size: int = 1) -> tuple[Tensor, ...]:
        size = self.options.kwargs.get("img_size")  # a model built for another size (a ViT's patch grid)
        if size is None:
            _, height, width = self.model.pretrained_cfg.get("input_size", (3, 224, 224))
        else:
            height, width = (size, size) if isinstance(size, int) else size
        return (torch.zeros(batch_size, self.options.in_chans, height, width),)

    def forward(self, x: Tensor, features: bool = False) -> Tensor | dict[str, Tensor]:
        if not features:
            return self.model(x)
        f = self.model.forward_features(x)
        return {
            "logits": self.model.forward_head(f),
            "features": self.model.forward_head(f, pre_logits=True).flatten(1),
        }
