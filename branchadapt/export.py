"""``branchadapt export RUN_DIR --group NAME``: one group's own model out of a branched run.

A branched backbone holds every group's branches around the shared stages; a deployment needs
one group's plain network. ``export`` rebuilds the run's finished stage, takes the chosen
module's plain backbone for ``--group`` (its branches in place of the routers) and writes it as

- ``onnx``: ``torch.onnx.export`` (the ``torch.export``-based exporter) with a dynamic batch
  dimension, checked against the eager model with onnxruntime when it is installed;
- ``safetensors``: the plain state dict (``backbone.load_state_dict(load_file(path))`` into the
  backbone built from the run's config).

The model is traced with inputs shaped as the training data makes them when the task can say so
(:meth:`Task.example_inputs`): the shapes the run recorded with the stage's final weights, else
(a run that recorded none) the task's inputs from the data; without either, with the backbone's
own :meth:`Backbone.example_inputs`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from .branched import BranchedModel
from .errors import UserError
from .evaluation import LoadedStage, load_stage
from .interfaces import Backbone, Task
from .rundir import final_weights

FORMATS = ("onnx", "safetensors")
#: what a run keeps at its top level, and the folders of its training results: never an output
RUN_FILES = ("config.json", "config.toml", "metrics.jsonl")
RUN_FOLDERS = ("checkpoints", "stages")


@dataclass
class Exported:
    path: Path
    module: str
    group: str
    max_abs_diff: float | None = None  # onnxruntime vs eager on the example input (onnx only)
    note: str | None = None  # how the example input was made, when not as usual


def group_backbone(
    modules: dict[str, nn.Module], group: str, module: str | None = None
) -> tuple[str, Backbone]:
    """``(name, plain backbone of group)`` for ``module`` (default: the first branched module)."""
    branched = {n: m for n, m in modules.items() if isinstance(m, BranchedModel)}
    if not branched:
        raise UserError("this run has no branched backbone to export")
    name = module or next(iter(branched))
    if name not in branched:
        raise UserError(
            f"--module {name!r} is not a branched module of this run; expected one of {list(branched)}"
        )
    model = branched[name]
    if group not in model.groups:
        raise UserError(f"--group {group!r} is not a group of this run; expected one of {list(model.groups)}")
    return name, model.extract(group).eval()


def _outputs(value: object) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _outputs(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _outputs(v)]
    raise TypeError(f"cannot export an output of type {type(value).__name__}")


def export_onnx(
    backbone: Backbone, path: Path, batch_size: int = 2, inputs: tuple[Tensor, ...] | None = None
) -> float | None:
    """Write ``backbone`` as ONNX (dynamic batch), traced with ``inputs`` (default: its
    ``example_inputs``); returns onnxruntime's max abs difference, if available."""
    try:
        import onnxscript  # noqa: F401  (the torch.export-based exporter needs it)
    except ImportError as exc:
        raise UserError("ONNX export needs onnx and onnxscript: pip install 'branchadapt[export]'") from exc
    try:
        inputs = inputs or backbone.example_inputs(batch_size)
    except NotImplementedError as exc:
        raise UserError(f"{exc}; the backbone must declare its inputs to be exported") from exc
    with torch.no_grad():
        n_outputs = len(_outputs(backbone(*inputs)))
    input_names = _names(backbone, "input", len(inputs))
    output_names = _names(backbone, "output", n_outputs)
    batch = torch.export.Dim("batch")
    # one self-contained file unless the weights exceed protobuf's 2 GiB: then "<name>.data" beside it,
    # which the .onnx names; both are written under a temporary folder and moved into place
    weight_bytes = sum(t.numel() * t.element_size() for t in backbone.state_dict().values())
    external = weight_bytes >= 2**31 - 2**27
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as folder:
        tmp = Path(folder) / path.name
        with torch.no_grad():
            torch.onnx.export(
                backbone,
                inputs,
                str(tmp),
                dynamo=True,
                external_data=external,
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=tuple({0: batch} for _ in inputs),
                verbose=False,
            )
        data, side = onnx_data_file(tmp), onnx_data_file(path)
        separate = data.exists()
        if separate:
            os.replace(data, side)
        os.replace(tmp, path)
        if not separate and side.exists():  # an earlier, larger export's weights: this model holds its own
            side.unlink()
    return onnx_difference(backbone, path, inputs)


def _names(backbone: Backbone, kind: str, count: int) -> list[str]:
    """The graph's ``kind`` ("input"/"output") names: the backbone's declared ones, else numbered."""
    declared = tuple(getattr(backbone, f"{kind}_names", ()))
    if not declared:
        return [f"{kind}{i}" for i in range(count)]
    if len(declared) != count or len(set(declared)) != count:
        raise UserError(
            f"{type(backbone).__name__}.{kind}_names = {declared!r}: expected {count} distinct names, "
            f"one per {kind} of its forward"
        )
    return list(declared)


def onnx_data_file(path: Path) -> Path:
    """Where the ONNX exporter puts the weights of a model too large for one file: beside it."""
    return path.with_name(f"{path.name}.data")


def onnx_difference(backbone: nn.Module, path: Path, inputs: tuple[Tensor, ...]) -> float | None:
    """Max abs difference between onnxruntime and eager outputs on random inputs (None: no onnxruntime)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    gen = torch.Generator().manual_seed(0)
    feeds = [random_input(tuple(x.shape), x.dtype, gen) for x in inputs]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), feeds, strict=True)})
    with torch.no_grad():
        want = _outputs(backbone(*feeds))
    return max(float((torch.from_numpy(g) - w).abs().max()) for g, w in zip(got, want, strict=True))


def export_run(
    run_dir: Path,
    group: str,
    fmt: str = "onnx",
    module: str | None = None,
    stage: str | None = None,
    out: Path | str | None = None,
    overwrite: bool = False,
) -> Exported:
    """Export ``group``'s plain model from a finished stage of ``run_dir``; an existing file at
    the output path is refused unless ``overwrite``."""
    from .checkpoint import save_state, state_copy

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: expected one of {list(FORMATS)}")
    suffix = "" if out is None else Path(out).suffix.lower()
    other = next((f for f in FORMATS if f != fmt and suffix == f".{f}"), None)
    if other is not None:  # a file named for the other format would be misread by every tool
        raise UserError(
            f"--out {out}: the name says {other}, but --format is {fmt}; name it "
            f"{Path(str(out)).stem}.{fmt} or pass --format {other}"
        )
    loaded = load_stage(run_dir, stage, "cpu")
    name, backbone = group_backbone(loaded.modules, group, module)
    default_name = f"{name}-{group}.{fmt}"
    path = Path(run_dir) / "export" / default_name if out is None else Path(out)
    # an existing folder, or one named with a trailing slash: the file goes inside it
    if path.is_dir() or str(out).endswith(("/", os.sep)):
        path = path / default_name
    blocker = next((p for p in path.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise UserError(f"--out {out}: {blocker} is a file, not a folder")
    outputs = [path, onnx_data_file(path)] if fmt == "onnx" else [path]
    label = str(path) if out is None else f"--out {out}"
    owner = next((o for o in (belongs_to_run(run_dir, p) for p in outputs) if o is not None), None)
    if owner is not None:  # even with --overwrite: the run would be lost
        raise UserError(
            f"{label}: {owner} belongs to the run (export never replaces its files); choose another "
            f"--out, e.g. {Path(run_dir) / 'export' / default_name}"
        )
    taken = [p for p in outputs if p.exists() or p.is_symlink()]
    if taken and not overwrite:
        raise UserError(f"{taken[0]} exists; pass --overwrite to replace it, or --out another file")
    with _writing(path.parent, label):
        inputs, note = (None, None) if fmt != "onnx" else _data_inputs(loaded, name)
        if fmt == "safetensors":  # the plain state dict: backbone.load_state_dict(load_file(path))
            save_state(path, state_copy(backbone), {"module": name, "group": group, "stage": loaded.stage})
            return Exported(path, name, group)
        return Exported(path, name, group, export_onnx(backbone, path, inputs=inputs), note)


def belongs_to_run(run_dir: Path | str, path: Path) -> Path | None:
    """The run's own file or folder (:data:`RUN_FILES`, :data:`RUN_FOLDERS`) that writing ``path``
    would replace or write into, symlinks and ``..`` resolved; None for anywhere else."""
    where, run = Path(path).resolve(), Path(run_dir)
    for name in RUN_FOLDERS:
        folder = (run / name).resolve()
        if where == folder or folder in where.parents:
            return run / name
    return next((run / n for n in RUN_FILES if where == (run / n).resolve()), None)


@contextmanager
def _writing(folder: Path, label: str) -> Iterator[None]:
    """Make ``folder`` (and check a file can be made in it) before the body runs; a folder that
    cannot be written, now or in the body, is a user error naming ``label``, and the folders made
    here are removed again (a file written before is left as it was: outputs are moved into place)."""
    made = [p for p in (folder, *folder.parents) if not (p.exists() or p.is_symlink())]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".export-probe.")
        os.close(fd)
        os.unlink(probe)
        yield
    except BaseException as exc:
        for p in made:  # deepest first; one holding anything else is kept
            try:
                p.rmdir()
            except OSError:
                break
        if not isinstance(exc, (OSError, SafetensorError)):
            raise
        raise UserError(f"{label}: cannot write in {folder} ({_reason(exc)}); choose another --out") from None


def _reason(exc: BaseException) -> str:
    """The operating system's words for a failed write (safetensors wraps them in a Rust debug dump)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    found = re.search(r'I/O error: (.+?) \(os error \d+\)|message: "([^"]+)"', str(exc))
    return (found.group(1) or found.group(2)) if found else str(exc)


#: dtypes a recorded input may have (random values for the floats, zeros for the others)
_RECORDABLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool, torch.uint8, torch.int8,
               torch.int16, torch.int32, torch.int64)  # fmt: skip
#: a record asking for more elements than this is not believed (a damaged or foreign file)
MAX_RECORDED_ELEMENTS = 1 << 28


def random_input(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> Tensor:
    """An input of ``shape`` and ``dtype``: uniform in [-1, 1) for floats, zeros otherwise."""
    if dtype.is_floating_point:
        return (torch.rand(shape, generator=gen) * 2 - 1).to(dtype)
    return torch.zeros(shape, dtype=dtype)


def _recorded_specs(record: object, batch_size: int) -> list[tuple[tuple[int, ...], torch.dtype]] | None:
    """``[(shape with the batch, dtype), ...]`` from a record ``[[dtype name, [dims]], ...]``;
    None unless every entry is well-formed and the whole stays under MAX_RECORDED_ELEMENTS."""
    if not isinstance(record, list) or not record:
        return None
    specs, total = [], 0
    for entry in record:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
            return None
        dtype, dims = getattr(torch, entry[0], None), entry[1]
        if dtype not in _RECORDABLE or not isinstance(dims, list):
            return None
        if not all(type(d) is int and d > 0 for d in dims):
            return None
        shape = (batch_size, *dims)
        total += math.prod(shape)
        if total > MAX_RECORDED_ELEMENTS:
            return None
        specs.append((shape, dtype))
    return specs


def recorded_inputs(weights: Path, module: str, batch_size: int = 2) -> tuple[Tensor, ...] | None:
    """Inputs for ``module`` shaped as the data's inputs that a run tried before training and
    recorded with the stage's final weights (:func:`random_input` values); None when the file
    has no usable record (a run of an older branchadapt, a task that makes none, a damaged one)."""
    try:
        with safe_open(str(weights), "pt") as fh:
            record = json.loads((fh.metadata() or {}).get("inputs", "{}"))
    except (OSError, SafetensorError, ValueError):  # unreadable: nothing recorded
        return None
    specs = _recorded_specs(record.get(module) if isinstance(record, dict) else None, batch_size)
    if specs is None:
        return None
    gen = torch.Generator().manual_seed(0)
    return tuple(random_input(shape, dtype, gen) for shape, dtype in specs)


def _data_inputs(loaded: LoadedStage, module: str) -> tuple[tuple[Tensor, ...] | None, str | None]:
    """Inputs shaped as the training data's where the task can make them: as the run recorded
    them with the final weights, else from the data (None: the backbone's own
    ``example_inputs``), and a note when the data was wanted but could not be read."""
    if type(loaded.task).example_inputs is Task.example_inputs:
        return None, None
    recorded = recorded_inputs(final_weights(loaded.trainer.run_dir, loaded.stage), module)
    if recorded is not None:  # no need to read the data (gone, on another machine, a cache to regenerate)
        return recorded, None
    try:
        return loaded.task.example_inputs(module, loaded.trainer.build_source("train")), None
    except (UserError, OSError) as exc:  # the data has moved, is on another machine, or its cache
        # cannot be written: the weights suffice
        return None, f"traced at the backbone's own input size, not the data's ({exc})"


def add_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export", help="write one group's plain model of a finished run (ONNX/safetensors)"
    )
    p.add_argument("run_dir", type=Path, help="run directory")
    p.add_argument("--group", required=True, help="whose branches to take")
    p.add_argument("--format", dest="fmt", default="onnx", choices=FORMATS, help="default: onnx")
    p.add_argument("--module", default=None, help="which branched module (default: the first)")
    p.add_argument("--stage", default=None, help="stage whose final weights to export (default: last)")
    p.add_argument(
        "--out",
        type=str,
        default=None,
        help="a file, or a folder (existing, or ending in /) to write MODULE-GROUP.FORMAT in "
        "(default: RUN_DIR/export/MODULE-GROUP.FORMAT)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(handler=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    result = export_run(
        args.run_dir, args.group, args.fmt, args.module, args.stage, args.out, overwrite=args.overwrite
    )
    print(f"{result.module} for group {result.group} written to {result.path}")
    if result.note:
        print(f"note: {result.note}")
    if result.max_abs_diff is not None:
        print(f"onnxruntime vs eager: max abs difference {result.max_abs_diff:.2e}")
    return 0
