"""Translation throughput of one group's generator: eager, torch.compile, ONNX Runtime.

The photo2cartoon generator (``--width``, ``--size`` px) as ``branchadapt export`` produces it (a
plain backbone with one group's branches), images/s at batch ``--batch``, median of ``--repeat``
timed batches after warm-up (eager in the default layout and in channels_last interleaved). Also
prints the compile time and the ONNX export time, and the largest output difference of the
compiled and ONNX models against eager.

    .venv/bin/python benchmarks/inference.py --size 256 --width 32 --batch 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import branchadapt as ba
from branchadapt.export import export_onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from interleave import rounds_order
from step_time import repeat_times


def rate(fn: Callable[[], object], batch: int, repeat: int) -> float:
    return batch / statistics.median(repeat_times(fn, repeat))


def interleaved_rates(fns: dict[str, Callable[[], object]], batch: int, repeat: int) -> dict[str, float]:
    """Images/s of each function, their timed calls alternating (order reversed every other
    round) so that drift in the machine's speed hits all alike; one untimed call each first."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for name, fn in rounds_order(list(fns.items()), repeat):
        start = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - start)
    return {name: batch / statistics.median(t) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = ba.build_backbone("ugatit", width=args.width, image_size=args.size).eval()
    x = torch.rand(args.batch, 3, args.size, args.size) * 2 - 1
    rows: list[tuple[str, float, str, str]] = []
    with torch.inference_mode():
        want = gen(x)[0]
        cl = ba.build_backbone("ugatit", width=args.width, image_size=args.size).eval()
        cl.load_state_dict(gen.state_dict())
        cl = cl.to(memory_format=torch.channels_last)
        xc = x.contiguous(memory_format=torch.channels_last)
        diff = float((cl(xc)[0] - want).abs().max())
        eager = interleaved_rates({"default": lambda: gen(x), "cl": lambda: cl(xc)}, args.batch, args.repeat)
        rows.append(("eager", eager["default"], "-", "0"))
        rows.append(("eager, channels_last", eager["cl"], "-", f"{diff:.1e}"))
    if not args.no_compile:
        compiled = torch.compile(gen)
        start = time.perf_counter()
        with torch.inference_mode():
            compiled(x)
            setup = f"{time.perf_counter() - start:.0f} s"
            diff = float((compiled(x)[0] - want).abs().max())
            rows.append(
                ("torch.compile", rate(lambda: compiled(x), args.batch, args.repeat), setup, f"{diff:.1e}")
            )
    try:
        import onnxruntime as ort
    except ImportError:
        ort = None
    if ort is not None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "gen.onnx"
            start = time.perf_counter()
            export_onnx(gen, path)
            setup = f"{time.perf_counter() - start:.0f} s"
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = args.threads
            session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            feed = {session.get_inputs()[0].name: x.numpy()}
            got = session.run(None, feed)[0]
            diff = float(np.abs(got - want.numpy()).max())
            rows.append(
                (
                    "onnxruntime",
                    rate(lambda: session.run(None, feed), args.batch, args.repeat),
                    setup,
                    f"{diff:.1e}",
                )
            )
    print(f"generator width {args.width}, {args.size} px, batch {args.batch}, {args.threads} threads, "
          f"median of {args.repeat}\n")  # fmt: skip
    print("| runtime | images/s | setup | max abs diff vs eager |")
    print("|---|---:|---:|---:|")
    for name, r, setup, diff in rows:
        print(f"| {name} | {r:.2f} | {setup} | {diff} |")


if __name__ == "__main__":
    main()
