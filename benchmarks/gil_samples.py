"""How much Python a training step runs while holding the GIL, from py-spy's raw output.

With both directions of a step at once (``task.concurrent``), the two directions run in two Python
threads, and every operation a thread issues from Python takes the GIL for its dispatch; Python
that one thread runs, the other may wait for. ``py-spy record --gil`` samples only threads that
hold the GIL. Record a configuration's steps with it (py-spy is not a dependency: ``pip install
py-spy`` anywhere), then summarise the files here:

    py-spy record --gil --subprocesses -r 200 -f raw -o ours.txt -- \\
        .venv/bin/python benchmarks/one_config.py --size 64 --stage 2 --steps 10 --warmup 2 \\
        --rounds 1 --threads 2 --config "ours="
    .venv/bin/python benchmarks/gil_samples.py --rate 200 --steps 12 ours.txt no_branches.txt

Samples in building the model and importing modules are left out; ``--steps`` (warm-up steps
included) turns the rest into seconds of GIL-held Python per step. The table also lists the
functions that held the GIL most themselves (the innermost Python frame of each sample).
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

#: frames whose samples are set-up, not steps
SETUP = ("build (", "build_stage (", "_find_and_load (", "load_experiment (")


def read(path: Path) -> tuple[int, Counter[str]]:
    """GIL samples of the steps in a py-spy raw file, and their count per innermost function."""
    total, leaves = 0, Counter[str]()
    for line in path.read_text().splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit() or any(s in stack for s in SETUP):
            continue
        frames = stack.split(";")
        python = any("(" in f for f in frames[1:])  # else a process or thread root alone
        leaf = frames[-1].split(" (")[0] if python else "(no Python frame)"
        total += int(count)
        leaves[leaf] += int(count)
    return total, leaves


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", type=Path, nargs="+", help="py-spy raw outputs (-f raw)")
    ap.add_argument("--rate", type=float, default=200, help="py-spy's sampling rate (-r)")
    ap.add_argument("--steps", type=int, required=True, help="steps each recording ran (warm-up included)")
    ap.add_argument("--top", type=int, default=5, help="functions listed per file")
    args = ap.parse_args()
    print("| recording | GIL samples | GIL-held Python per step (s) | vs first | held most by (samples) |")
    print("|---|---:|---:|---:|---|")
    first = None
    for path in args.files:
        total, leaves = read(path)
        if first is None:
            first = total or 1
        top = ", ".join(f"{name} ({n})" for name, n in leaves.most_common(args.top))
        print(
            f"| {path.name} | {total:,} | {total / args.rate / args.steps:.3f} | {total / first:.2f} | {top} |"
        )


if __name__ == "__main__":
    main()
