"""Do branches with selective back-propagation win on few-shot classification (timm + digits)?

Trains each method with the same transfer budget over several seeds, reusing the stage-1 model
(anchor domain only) within a seed, evaluates per-group test accuracy, and writes a mean +- std
table to ``docs/results_digits.md`` after every run (re-running skips finished runs).

    python benchmarks/digits_study.py [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

import branchadapt as ba
from branchadapt.evaluation import evaluate_run
from branchadapt.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
METHODS = [  # (label, experiment, trains from the shared basic model)
    ("basic model (anchor only)", "digits.toml", ["stages.transfer.enabled=false"], True),
    ("one model, all data mixed", "digits/mixed.toml", [], False),
    ("finetune all on few-shot", "digits/finetune_all.toml", [], True),
    ("branches, shared frozen", "digits/frozen_shared.toml", [], True),
    ("branches + selective BP (few-shot frozen)", "digits.toml", [], True),
    (
        "branches + selective BP (few-shot detached)",
        "digits.toml",
        ['stages.transfer.splitter.others="detached"'],
        True,
    ),
]


def run(label: str, file: str, extra: list[str], shared: bool, seed: int, out: Path) -> dict:
    run_dir = out / (f"s{seed}-" + "".join(c if c.isalnum() else "_" for c in label))
    done = run_dir / "study.json"
    if done.is_file():
        return json.loads(done.read_text())
    exp = ba.load_experiment(EXAMPLES / file, [f"seed={seed}", "train.progress=none", *extra])
    basic = out / f"s{seed}-basic.safetensors"
    if shared and basic.is_file():
        (run_dir / "stages" / "basic").mkdir(parents=True, exist_ok=True)
        shutil.copy(basic, run_dir / "stages" / "basic" / "final.safetensors")
    t0 = time.perf_counter()
    Trainer(exp, run_dir=run_dir, device="cpu").run()
    seconds = time.perf_counter() - t0
    if shared and not basic.is_file():
        shutil.copy(run_dir / "stages" / "basic" / "final.safetensors", basic)
    groups = evaluate_run(run_dir, device="cpu")["groups"]
    result = {"label": label, "seed": seed, "seconds": seconds, "groups": groups}
    done.write_text(json.dumps(result, indent=1))
    return result


def write(path: Path, results: list[dict], command: str, wall: float) -> None:
    groups = list(results[0]["groups"])
    lines = [
        "| method | seeds | " + " | ".join(groups) + " | few-shot mean |",
        "|---|---:|" + "---:|" * (len(groups) + 1),
    ]
    for label, *_ in METHODS:
        rows = [r for r in results if r["label"] == label]
        if not rows:
            continue
        cells = []
        for g in groups:
            v = [r["groups"][g]["accuracy"] for r in rows]
            cells.append(f"{statistics.mean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.3f}")
        few = [statistics.mean(r["groups"][g]["accuracy"] for g in groups[1:]) for r in rows]
        cells.append(f"{statistics.mean(few):.3f} ± {statistics.stdev(few) if len(few) > 1 else 0.0:.3f}")
        lines.append(f"| {label} | {len(rows)} | " + " | ".join(cells) + " |")
    seeds = sorted({r["seed"] for r in results})
    path.write_text(f"""## Digits study (timm plugin set): per-group test accuracy

Command: `{command}` (finished runs are skipped on re-run). Seeds finished: {seeds}; wall time
{wall / 60:.1f} min on 2 CPU cores (1 torch thread, sharing the machine with the cartoon study).
Recipe `examples/digits.toml` (resnet10t, 32 px, stage 1: 300 steps on `clean`; transfer: 150
steps) and its baselines in `examples/digits/`; the mixed model trains from scratch for 450
steps. Test split: 30 images per class and domain (300 per group). Mean ± std over seeds.

{chr(10).join(lines)}
""")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "digits-study")
    ap.add_argument("--results", type=Path, default=ROOT / "docs" / "results_digits.md")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    command = (
        f"python benchmarks/digits_study.py --seeds {' '.join(map(str, args.seeds))} --threads {args.threads}"
    )
    results: list[dict] = []
    t0 = time.perf_counter()
    for seed in args.seeds:
        for label, file, extra, shared in METHODS:
            results.append(run(label, file, extra, shared, seed, args.out))
            write(args.results, results, command, time.perf_counter() - t0)
            print(f"seed {seed} {label}: {results[-1]['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
