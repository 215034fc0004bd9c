"""Image grids: training samples (input | translation | cycle per group) and CAM heatmaps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch
from torch import Tensor, nn

import branchadapt as ba

from .data import IMAGE_SUFFIXES, to_uint8

if TYPE_CHECKING:
    from .task import Translate


def save_png(path: Path, rgb: np.ndarray) -> Path:
    """Write an RGB uint8 image atomically (temp file + rename), as PNG unless the name ends in
    another image suffix (``.jpg``: JPEG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower() if path.suffix.lower() in IMAGE_SUFFIXES else ".png"
    ok, buf = cv2.imencode(suffix, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"{suffix} encoding failed for {path}")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf.tobytes())
    tmp.replace(path)
    return path


def grid(rows: Sequence[Sequence[Tensor]], pad: int = 2) -> np.ndarray:
    """Images (CHW in [-1, 1]) laid out row by row on a white canvas."""
    tiles = [[to_uint8(t) for t in row] for row in rows]
    h, w = tiles[0][0].shape[:2]
    ncol = max(len(r) for r in tiles)
    canvas = np.full((len(tiles) * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(tiles):
        for j, tile in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y : y + h, x : x + w] = cv2.resize(tile, (w, h)) if tile.shape[:2] != (h, w) else tile
    return canvas


def heatmap_overlay(image: Tensor, heatmap: Tensor) -> Tensor:
    """A CAM heatmap (1, h, w), normalised and colour-mapped over its image, as CHW in [-1, 1]."""
    rgb = to_uint8(image)
    hm = heatmap.detach().float().squeeze(0).cpu().numpy()
    hm = (hm - hm.min()) / max(float(hm.max() - hm.min()), 1e-8)
    hm = cv2.resize((hm * 255).astype(np.uint8), rgb.shape[1::-1], interpolation=cv2.INTER_LINEAR)
    colour = cv2.cvtColor(cv2.applyColorMap(hm, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    mixed = cv2.addWeighted(rgb, 0.5, colour, 0.5, 0)
    return torch.from_numpy(mixed).permute(2, 0, 1).float() / 127.5 - 1


def first_items(source: ba.DataSource, group: str, stream: str, count: int) -> Tensor | None:
    n = min(count, source.sizes().get(group, {}).get(stream, 0))
    if n == 0:
        return None
    items = [source.get(group, stream, i, np.random.default_rng(i)) for i in range(n)]
    return torch.stack([it["image"] for it in items])


def write_training_grids(
    task: Translate,
    modules: Mapping[str, nn.Module],
    source: ba.DataSource,
    device: torch.device,
    out_dir: Path,
    step: int,
) -> list[Path]:
    """One PNG per group: rows of photo | cartoon | cycle, then cartoon | photo | cycle."""
    written = []
    for gi, group in enumerate(task.context.groups):
        photos = first_items(source, group, "photo", task.options.sample_count)
        cartoons = first_items(source, group, "cartoon", task.options.sample_count)
        rows: list[list[Tensor]] = []
        for images, fwd, back in ((photos, "gen_a2b", "gen_b2a"), (cartoons, "gen_b2a", "gen_a2b")):
            if images is None:
                continue
            x = images.to(device)
            ids = torch.full((x.shape[0],), gi, dtype=torch.long, device=device)
            out = modules[fwd](x, groups=ids)[0]
            cyc = modules[back](out, groups=ids)[0]
            rows += [[x[i].cpu(), out[i].cpu(), cyc[i].cpu()] for i in range(x.shape[0])]
        if rows:
            written.append(save_png(out_dir / f"{group}-{step:08d}.png", grid(rows)))
    return written
