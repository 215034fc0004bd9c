"""Does keeping freed memory in the process (``train.retain_freed_memory``) make the step faster?

The setting is process-wide and cannot be undone inside a process, so every measurement runs in a
fresh child process; the two settings alternate (in reversed order every other round) so that
drift in the machine's speed hits both alike. Each child times stage 1 of the recipe with the
reference's maths (one photo + one cartoon, five losses, face-ID through a MobileFaceNet, as in
``step_time.py``): median of ``--steps`` after ``--warmup``, with the minor page faults and the
system CPU time per step (``getrusage``) and the peak RSS. With ``--reference-repo`` the
photo2cartoon reference iteration (``reference_step.py``) is measured the same way, with glibc's
defaults and with the setting applied: what it would gain from it too. A third setting, ``one arena``,
adds ``MALLOC_ARENA_MAX=1`` to the retained one (see ``SETTING_ENV``).

    .venv/bin/python benchmarks/allocator.py --sizes 128 256 --rounds 2 --steps 4 --warmup 1 \\
        --threads 2 [--reference-repo /path/to/photo2cartoon]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from interleave import rounds_order
from step_time import SAME_RECOGNIZER, build

from branchadapt import hostmem

SETTINGS = ("default", "retained", "one arena")
#: the child's extra environment per setting; "one arena": retained, and every thread allocating from
#: glibc's main arena (worker threads otherwise get arenas of their own, whose heaps hold at most
#: 64 MiB: larger blocks are mapped afresh and unmapped when freed, whatever the thresholds)
SETTING_ENV = {"one arena": {"MALLOC_ARENA_MAX": "1"}}


def child(
    program: str, setting: str, size: int, width: int, steps: int, warmup: int, repo: Path | None
) -> dict:
    """Time ``program`` (ours / reference) at ``size`` with glibc's defaults or memory retained."""
    step: Callable[[int], object]
    if setting != "default" and not hostmem.retain_freed_memory():
        sys.exit("the setting could not be applied here (needs glibc, no MALLOC_* variables)")
    if program == "ours":  # the trainer applies the setting again (or not) from the option
        retain = "false" if setting == "default" else "true"
        trainer, rt = build(size, width, 0, [*SAME_RECOGNIZER, f"train.retain_freed_memory={retain}"])
        step = lambda i: trainer.train_step(rt, rt.data[i % len(rt.data)])  # noqa: E731
    else:
        from reference_step import ReferenceStep

        assert repo is not None
        reference = ReferenceStep(repo, size, width)
        step = lambda i: reference(*reference.batch())  # noqa: E731
    for i in range(warmup):
        step(i)
    times = []
    before = resource.getrusage(resource.RUSAGE_SELF)
    for i in range(steps):
        start = time.perf_counter()
        step(warmup + i)
        times.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"seconds": statistics.median(times), "faults": (after.ru_minflt - before.ru_minflt) / steps,
            "system": (after.ru_stime - before.ru_stime) / steps, "peak_mb": after.ru_maxrss / 2**10}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2, help="child processes per setting (alternating)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--reference-repo", type=Path, help="photo2cartoon checkout: measure its iteration too")
    ap.add_argument("--child", nargs=3, metavar=("PROGRAM", "SETTING", "SIZE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        program, setting, size = args.child
        result = child(program, setting, int(size), args.width, args.steps, args.warmup, args.reference_repo)
        print(json.dumps(result))
        return
    if hostmem._glibc() is None:
        sys.exit("this machine's C library is not glibc: the setting does nothing here")
    env = {k: v for k, v in os.environ.items() if k not in hostmem.ENVIRONMENT}
    programs = ["ours", *(["reference code"] if args.reference_repo else [])]
    print(f"stage 1 with the reference's maths, width {args.width}, {args.threads} threads; per child process: "
          f"median of {args.steps} steps after {args.warmup}; median over {args.rounds} processes per setting\n")  # fmt: skip
    print("| size | program | glibc default (s) | retained (s) | retained / default | page faults per step "
          "| system CPU s per step | peak RSS (MB) | one arena (s) | one arena / retained "
          "| one arena: page faults, system CPU s per step, peak RSS (MB) |")  # fmt: skip
    print("|---:|---|---:|---:|---:|---|---|---|---:|---:|---|", flush=True)
    for size in args.sizes:
        for program in programs:
            runs: dict[str, list[dict]] = {s: [] for s in SETTINGS}
            for setting in rounds_order(SETTINGS, args.rounds):
                cmd = [sys.executable, __file__, "--child", program.split()[0], setting, str(size),
                       *map(str, ["--width", args.width, "--steps", args.steps, "--warmup", args.warmup,
                                  "--threads", args.threads])]  # fmt: skip
                if args.reference_repo:
                    cmd += ["--reference-repo", str(args.reference_repo)]
                done = subprocess.run(
                    cmd, capture_output=True, text=True, env={**env, **SETTING_ENV.get(setting, {})}
                )
                if done.returncode:
                    sys.exit(
                        f"{program} ({setting}, {size} px): the child process failed:\n{done.stderr[-3000:]}"
                    )
                runs[setting].append(json.loads(done.stdout.strip().splitlines()[-1]))
            m = {s: {k: statistics.median(r[k] for r in runs[s]) for k in runs[s][0]} for s in SETTINGS}
            d, k, a = m["default"], m["retained"], m["one arena"]
            print(f"| {size} | {program} | {d['seconds']:.3f} | {k['seconds']:.3f} | {k['seconds'] / d['seconds']:.2f} "
                  f"| {d['faults']:,.0f} -> {k['faults']:,.0f} | {d['system']:.2f} -> {k['system']:.2f} "
                  f"| {d['peak_mb']:,.0f} -> {k['peak_mb']:,.0f} | {a['seconds']:.3f} | {a['seconds'] / k['seconds']:.2f} "
                  f"| {a['faults']:,.0f}, {a['system']:.2f}, {a['peak_mb']:,.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
