"""Per-group, per-direction metrics of a translator on a paired test split.

For every group and direction (``a2b``: photo -> cartoon, ``b2a``: cartoon -> photo) against the
paired ground truth: L1 (images in [0, 1]), PSNR and SSIM (torchmetrics), identity similarity
(cosine of recognizer embeddings of input and output) and, for photo -> cartoon on toonfaces
groups, trait accuracy (the toonfaces trait classifier must find exactly the traits of the
ground-truth identity in the generated cartoon). A grid per group (input | output | ground
truth) is written beside the metrics, and every translated test photo under ``translated/<group>/``.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

import branchadapt as ba

from .data import to_uint8
from .recognizers import WEIGHTS_OPTION
from .sampling import grid, save_png

if TYPE_CHECKING:
    from .task import Translate

DIRECTIONS = {"a2b": ("photo", "cartoon", "gen_a2b"), "b2a": ("cartoon", "photo", "gen_b2a")}


def image_metrics(output: Tensor, target: Tensor) -> dict[str, Tensor]:
    """Per-image L1, PSNR and SSIM of images in [-1, 1] (computed in [0, 1])."""
    x = ((output.float() + 1) / 2).clamp(0, 1)
    y = ((target.float() + 1) / 2).clamp(0, 1)
    l1 = (x - y).abs().flatten(1).mean(1)
    psnr = torch.stack(
        [peak_signal_noise_ratio(a[None], b[None], data_range=1.0) for a, b in zip(x, y, strict=True)]
    )
    ssim = structural_similarity_index_measure(x, y, data_range=1.0, reduction="none")
    assert isinstance(ssim, Tensor)
    return {"l1": l1, "psnr": psnr, "ssim": ssim}


def _recognizer(spec: dict[str, Any] | None) -> nn.Module | None:
    if not spec:
        return None
    spec = dict(spec)
    kind = str(spec.pop("type"))
    try:
        return ba.build_backbone(kind, **spec).requires_grad_(False).eval()
    except ba.UserError as exc:  # the recognizers' messages name the face-ID loss's keys
        message = str(exc).replace(WEIGHTS_OPTION, "task.eval_recognizer.weights")
        exc.args = (f"task.eval_recognizer: {message.removeprefix('task.eval_recognizer: ')}",)
        raise


def _trait_judge(source: ba.DataSource, groups: tuple[str, ...]) -> Any:
    """The toonfaces trait classifier and seed when the data is the embedded set, else None."""
    opts = getattr(source, "options", None)
    if opts is None or getattr(opts, "root", "x") is not None:
        return None
    try:
        from branchadapt_toonfaces import GROUPS
        from branchadapt_toonfaces.judges import load_trait_classifier
    except ImportError:
        return None
    if any(g not in GROUPS for g in groups):
        return None
    return load_trait_classifier(), opts.toonfaces.seed


def _trait_hits(judge: Any, group: str, start: int, fakes: Tensor) -> Tensor:
    """1 where the generated cartoon shows exactly its ground-truth identity's traits."""
    from branchadapt_toonfaces import identity_for
    from branchadapt_toonfaces.judges import trait_match

    classifier, seed = judge
    identities = [identity_for(seed, "test", group, "cartoon", start + i) for i in range(fakes.shape[0])]
    return trait_match(classifier.to(fakes.device), fakes, identities).float()


def evaluate_translation(
    task: Translate,
    modules: Mapping[str, nn.Module],
    source: ba.DataSource,
    device: torch.device,
    out_dir: Path | None = None,
    batch_size: int = 16,
) -> dict[str, dict[str, float]]:
    recognizer = _recognizer(task.options.eval_recognizer)
    if recognizer is not None:
        recognizer.to(device)
    judge = _trait_judge(source, task.context.groups) if task.options.eval_traits else None
    results: dict[str, dict[str, float]] = {}
    counts = {g: source.sizes().get(g, {}) for g in task.context.groups}
    if not any(min(c.get("photo", 0), c.get("cartoon", 0)) for c in counts.values()):
        raise ba.UserError(
            f"no paired photos and cartoons in the {source.split!r} split of any group; expected "
            "<root>/test/photo/<group>/ and <root>/test/cartoon/<group>/ (or testA/testB) with images"
        )
    if source.split == "train":
        print(
            "note: the train split holds unpaired photos and cartoons: the pair scores (l1, psnr, ssim) "
            "compare unrelated images there; the test split is the paired one",
            file=sys.stderr,
        )
    for gi, group in enumerate(task.context.groups):
        sizes = counts[group]
        photos, cartoons = sizes.get("photo", 0), sizes.get("cartoon", 0)
        pairs = min(photos, cartoons)
        if photos != cartoons:
            print(
                f"note: group {group}: {photos} photos and {cartoons} cartoons in the {source.split!r} "
                + (
                    f"split; the first {pairs} of each (by file name) are scored as pairs"
                    if pairs
                    else "split; left out"
                ),
                file=sys.stderr,
            )
        if pairs == 0:
            continue
        sums: dict[str, list[Tensor]] = {}
        rows: list[list[Tensor]] = []
        for direction, (src, dst, gen) in DIRECTIONS.items():
            for start in range(0, pairs, batch_size):
                idx = range(start, min(pairs, start + batch_size))
                x = torch.stack(
                    [source.get(group, src, i, np.random.default_rng(i))["image"] for i in idx]
                ).to(device)
                y = torch.stack(
                    [source.get(group, dst, i, np.random.default_rng(i))["image"] for i in idx]
                ).to(device)
                ids = torch.full((len(idx),), gi, dtype=torch.long, device=device)
                out = modules[gen](x, groups=ids)[0].float().clamp(-1, 1)
                found = image_metrics(out, y)
                if recognizer is not None:
                    found["id"] = F.cosine_similarity(recognizer(x).float(), recognizer(out).float(), dim=1)
                if judge is not None and direction == "a2b":
                    found["traits"] = _trait_hits(judge, group, start, out)
                for k, v in found.items():
                    sums.setdefault(f"{direction}/{k}", []).append(v.detach().cpu())
                if out_dir is not None and direction == "a2b":  # the translated test photos themselves
                    for i, k in enumerate(idx):
                        save_png(out_dir / "translated" / group / f"{k:05d}.png", to_uint8(out[i]))
                if start == 0:
                    rows += [[x[i].cpu(), out[i].cpu(), y[i].cpu()] for i in range(min(4, len(idx)))]
        results[group] = {k: float(torch.cat(v).mean()) for k, v in sums.items()}
        if out_dir is not None and rows:
            save_png(out_dir / f"{group}.png", grid(rows))
    return results
