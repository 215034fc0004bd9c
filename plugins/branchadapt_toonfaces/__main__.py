"""``python -m branchadapt_toonfaces --root DIR [--size 128] [--seed 0] [--preview out.png]``."""

from __future__ import annotations

import argparse
import time

from .dataset import DEFAULT_TRAIN_COUNTS, KINDS, SPLITS, TEST_PER_GROUP, ToonFaces
from .preview import save_preview


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m branchadapt_toonfaces", description=__doc__)
    ap.add_argument("--root", required=True, help="cache root folder")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-per-group", type=int, default=TEST_PER_GROUP)
    ap.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    ap.add_argument("--preview", default=None, help="also write a preview grid PNG here")
    ap.add_argument("--preview-count", type=int, default=4, help="test pairs per group in the preview")
    args = ap.parse_args(argv)

    ds = ToonFaces(args.root, args.size, args.seed, DEFAULT_TRAIN_COUNTS, args.test_per_group, args.workers)
    t0 = time.perf_counter()
    path = ds.ensure()
    dt = time.perf_counter() - t0
    total = sum(ds.count(s, k, g) for s in SPLITS for k in KINDS for g in ds.groups)
    print(f"toonfaces cache: {path}")
    print(f"{total} images ({args.size}px, seed {args.seed}) ready in {dt:.2f} s")
    if args.preview:
        t0 = time.perf_counter()
        out = save_preview(args.preview, seed=args.seed, size=args.size, per_group=args.preview_count)
        print(f"preview: {out} ({time.perf_counter() - t0:.2f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
