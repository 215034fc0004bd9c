"""``branchadapt translate RUN_DIR INPUT OUTPUT [--group NAME]``: batch inference with a trained run.

INPUT is an image, a folder of images (``--group`` required), or a folder with one sub-folder per
group (the sub-folder names pick the branches). Outputs mirror the input layout as PNG;
``--cam`` also writes the generator's CAM heatmap over each input (``<name>_cam.png``). Files
from an earlier translation are replaced only with ``--overwrite``; heatmaps an earlier ``--cam``
left beside replaced outputs are named, not deleted, when this run writes none.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from branchadapt import UserError
from branchadapt.evaluation import load_stage
from branchadapt.export import belongs_to_run

from .data import IMAGE_SUFFIXES, check_headers, list_images, read_rgb, to_tensor, to_uint8
from .sampling import heatmap_overlay, save_png

GENERATOR = {"a2b": "gen_a2b", "b2a": "gen_b2a"}
# image suffixes an output name may carry that OpenCV does not write: refused, not made a folder
UNWRITABLE = {".gif", ".heic", ".heif", ".avif", ".svg", ".ico", ".jxl"}


def add_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("translate", help="translate images with a trained run (photo <-> cartoon)")
    p.add_argument("run_dir", type=Path, help="run directory of a finished cartoon run")
    p.add_argument("input", type=Path, help="an image, a folder of images, or a folder of group sub-folders")
    p.add_argument(
        "output", type=Path, help="output folder (or an image file for a single image: .png, .jpg, ...)"
    )
    p.add_argument("--group", help="group whose branch translates (default: from sub-folder names)")
    p.add_argument("--direction", choices=sorted(GENERATOR), default="a2b", help="a2b: photo -> cartoon")
    p.add_argument("--stage", help="stage whose weights to use (default: the last)")
    p.add_argument("--cam", action="store_true", help="also save CAM heatmaps beside the outputs")
    p.add_argument("--overwrite", action="store_true", help="replace output files that already exist")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N, mps (default: the run's)")
    p.set_defaults(handler=run_translate)


def inference_layout(device: torch.device) -> torch.memory_format:
    """The generator's memory format for translating on ``device``.

    On a CPU the default layout: eager channels_last translated 0.84-0.89x as many images per
    second on the Intel Xeon of docs/performance.md and the same number on the AMD EPYC before it
    (``benchmarks/inference.py``). On CUDA channels_last, the native layout of cuDNN's tensor-core
    convolutions (TF32 is on, ``branchadapt.device.configure_backend``); not measured here.
    """
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def cam_path(target: Path) -> Path:
    """Where ``--cam`` writes the heatmap of the image translated into ``target``."""
    return target.with_name(f"{target.stem}_cam.png")


def written(target: Path, cam: bool) -> tuple[Path, ...]:
    """The files translating into ``target`` writes: the image and, with ``cam``, its heatmap."""
    return (target, cam_path(target)) if cam else (target,)


def plan_jobs(
    source: Path,
    output: Path,
    group: str | None,
    groups: tuple[str, ...],
    overwrite: bool = False,
    cam: bool = False,
    run_dir: Path | None = None,
) -> list[tuple[str, Path, Path]]:
    """(group, input image, output image) for every image to translate; without ``overwrite``
    an output (or, with ``cam``, a heatmap) that exists already is a user error, and one in
    ``run_dir``'s own files or folders (its checkpoints, stages) always is."""
    if not source.exists():
        raise UserError(f"{source}: no such file or folder")
    if group is not None and group not in groups:
        raise UserError(f"--group {group!r} is not a group of this run; expected one of {list(groups)}")
    if output.suffix.lower() in UNWRITABLE and not output.is_dir():
        raise UserError(
            f"{output}: cannot write {output.suffix} images; expected a folder or an image file ending in "
            f"{', '.join(sorted(IMAGE_SUFFIXES))}"
        )
    if source.is_file():
        if group is None:
            raise UserError(f"{source}: a single image needs --group (one of {list(groups)})")
        target = output if output.suffix.lower() in IMAGE_SUFFIXES else output / f"{source.stem}.png"
        jobs = [(group, source, target)]
    elif output.is_file() or output.suffix.lower() in IMAGE_SUFFIXES:
        raise UserError(
            f"{output}: a folder of images translates into a folder; expected a folder, not an image file"
        )
    elif group is not None:
        images = list_images(source)
        if not images:
            raise UserError(f"{source}: no images (expected {', '.join(sorted(IMAGE_SUFFIXES))})")
        jobs = [(group, p, output / f"{p.stem}.png") for p in images]
    else:
        jobs = by_group(source, output, groups)
    check_headers([p for _, p, _ in jobs])  # a file that is no image stops it before any is written
    checked(jobs, cam)
    if run_dir is not None:
        for target in (p for _, _, t in jobs for p in written(t, cam)):
            owner = belongs_to_run(run_dir, target)
            if owner is not None:  # even with --overwrite: the run would be lost
                raise UserError(
                    f"{output}: {owner} belongs to the run; translations are never written there "
                    f"({target} would be); choose another output"
                )
    existing = [p for _, _, t in jobs for p in written(t, cam) if p.exists()]
    if existing and not overwrite:
        raise UserError(
            f"{len(existing)} output file(s) exist already ({', '.join(map(str, existing[:3]))}"
            f"{', ...' if len(existing) > 3 else ''}); pass --overwrite to replace them, or choose "
            "another output"
        )
    return jobs


def by_group(source: Path, output: Path, groups: tuple[str, ...]) -> list[tuple[str, Path, Path]]:
    """The jobs of a folder of group sub-folders (hidden ones, and the output folder when it is
    one of them, left out)."""
    out = output.resolve()
    subdirs = sorted(
        d
        for d in source.iterdir()
        if d.is_dir()
        and not d.name.startswith(".")
        and not (out == d.resolve() or d.resolve() in out.parents)
    )
    unknown = [d.name for d in subdirs if d.name not in groups]
    if not subdirs or unknown:
        raise UserError(
            f"{source}: pass --group NAME, or put images in sub-folders named by group "
            f"(groups: {list(groups)}; unknown sub-folders: {unknown})"
        )
    loose = list_images(source)
    if loose:
        print(
            f"note: {len(loose)} image(s) directly in {source} are not translated (not in a group "
            f"sub-folder; translate them with --group NAME)",
            file=sys.stderr,
        )
    jobs = [(d.name, p, output / d.name / f"{p.stem}.png") for d in subdirs for p in list_images(d)]
    if not jobs:
        raise UserError(
            f"{source}: no images in its group sub-folders {[d.name for d in subdirs]} (expected "
            f"{', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return jobs


def checked(jobs: list[tuple[str, Path, Path]], cam: bool = False) -> None:
    """Refuse ``jobs`` where an output (with ``cam``, a heatmap too) would replace an input or
    another output, or an output's folder cannot be made (a file in the way)."""
    inputs = {p.resolve() for _, p, _ in jobs}
    seen: dict[Path, Path] = {}
    for _, source, output in jobs:
        for target in written(output, cam):
            where = target.resolve()
            if target.is_dir():
                raise UserError(f"{target} is a folder; an output image would be written in its place")
            if where in inputs:
                raise UserError(f"{target} would overwrite the input image {source}; choose another output")
            if where in seen:
                raise UserError(
                    f"{seen[where]} and {source} would both be written to {target} (the same name, or "
                    "one's heatmap named as the other); rename one of them"
                )
            seen[where] = source
    for folder in {t.parent for _, _, t in jobs}:
        blocker = next((p for p in (folder, *folder.parents) if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            raise UserError(f"{blocker} is a file; the output {folder} must be a folder")


def stale_heatmaps(jobs: list[tuple[str, Path, Path]]) -> set[Path]:
    """Files named as heatmaps of outputs about to be replaced (and not outputs of these jobs
    themselves): an earlier ``--cam``'s, which would no longer show their outputs. The command
    names them; it does not delete them (a file named so may be a translation of its own)."""
    targets = {t for _, _, t in jobs}
    return {
        cam_path(t) for t in targets if t.is_file() and cam_path(t) not in targets and cam_path(t).is_file()
    }


def _read(path: Path, done: int, output: Path) -> np.ndarray:
    """The input image; one that cannot be decoded says what was written before it."""
    try:
        return read_rgb(path)
    except UserError as exc:
        if not done:
            raise
        raise UserError(
            f"{exc}\n{done} image(s) before it were translated into {output}; fix or remove it and run "
            "again with --overwrite"
        ) from exc


def run_translate(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    loaded = load_stage(args.run_dir, args.stage, args.device)
    modules, device = loaded.modules, loaded.device
    if "gen_a2b" not in modules:
        raise UserError(f"{args.run_dir} is not a translation run (task {loaded.experiment.task.type!r})")
    groups = tuple(loaded.experiment.spec.groups)
    size = int(getattr(loaded.experiment.data.options, "size", 256))
    jobs = plan_jobs(args.input, args.output, args.group, groups, args.overwrite, args.cam, args.run_dir)
    stale = stale_heatmaps(jobs) if args.overwrite and not args.cam else set()
    layout = inference_layout(device)
    generator = modules[GENERATOR[args.direction]].to(memory_format=layout)
    columns = [TextColumn("translate"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    console = Console(stderr=True)
    with Progress(*columns, console=console, transient=True) as bar, torch.no_grad():
        task_id = bar.add_task("translate", total=len(jobs))
        said = time.monotonic()
        for start in range(0, len(jobs), args.batch_size):
            chunk = jobs[start : start + args.batch_size]
            images = []
            for _, path, _ in chunk:
                rgb = _read(path, start, args.output)
                if rgb.shape[:2] != (size, size):
                    rgb = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
                images.append(to_tensor(rgb))
            x = torch.stack(images).to(device).contiguous(memory_format=layout)
            ids = torch.tensor([groups.index(g) for g, _, _ in chunk], device=device)
            out, _, heat = generator(x, groups=ids)
            for i, (_, _, target) in enumerate(chunk):
                save_png(target, to_uint8(out[i]))
                if args.cam:
                    save_png(cam_path(target), to_uint8(heatmap_overlay(x[i], heat[i])))
            bar.advance(task_id, len(chunk))
            done = start + len(chunk)
            # no live bar without a terminal (a log file, a job): a line every 10 s and at the end
            if not console.is_terminal and (time.monotonic() - said >= 10 or done == len(jobs)):
                print(f"translate: {done}/{len(jobs)} images", file=sys.stderr, flush=True)
                said = time.monotonic()
    print(
        f"translated {len(jobs)} image{'s' if len(jobs) != 1 else ''} ({args.direction}) into {args.output}"
    )
    if stale:  # kept: a file named so may be a translation of its own, which is never deleted
        first = sorted(stale)[0]
        print(
            f"note: {len(stale)} file(s) named as heatmaps of replaced outputs ({first}"
            f"{', ...' if len(stale) > 1 else ''}) were left as they were; if an earlier --cam wrote "
            "them they show the old outputs: pass --cam to rewrite them, or remove them",
            file=sys.stderr,
        )
    return 0
