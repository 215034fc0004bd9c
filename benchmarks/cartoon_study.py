"""Do branches with selective back-propagation win? The paper's ablations on toonfaces, measured.

Trains, at a CPU-feasible size and with the same transfer budget for each, the basic model,
baselines 1-3, branches without selective BP and the full method (plus a split-depth sweep of the
full method), over several seeds; evaluates each on the paired toonfaces test split and writes a
mean +- std table per group and metric to ``docs/results.md``. The stage-1 basic model is trained
once per seed and shared by every method that starts from it. Results are written after every
run, so an interrupted study still leaves its finished rows; re-running skips finished runs.

    python benchmarks/cartoon_study.py [--seeds 0 1 2] [--basic-steps 500] [--transfer-steps 150]
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
# (label, experiment file relative to examples/, extra overrides)
METHODS = [
    ("basic model", "cartoon/basic_only.toml", []),
    ("baseline 1: mixed", "cartoon/baseline1_mixed.toml", []),
    ("baseline 2: finetune few-shot", "cartoon/baseline2_finetune.toml", []),
    ("baseline 3: per-group finetune", "cartoon/baseline3_per_group.toml", []),
    ("branches, no selective BP", "cartoon/no_selective_bp.toml", []),
    ("full method (low=top=2)", "cartoon.toml", []),
]
SWEEP = [
    (
        "full method, low=top=1",
        "cartoon.toml",
        ["stages.transfer.splitter.low=1", "stages.transfer.splitter.top=1"],
    ),
    (
        "full method, low=top=4",
        "cartoon.toml",
        ["stages.transfer.splitter.low=4", "stages.transfer.splitter.top=4"],
    ),
]
# follow-up questions, run only when named with --methods (not part of the default study)
INVESTIGATION = [
    (
        "full method, no group-cls loss",
        "cartoon.toml",
        ["losses.group_cls_g.weight=0", "losses.group_cls_d.weight=0"],
    ),
]
METRICS = ["a2b/traits", "a2b/id", "a2b/ssim", "a2b/l1", "b2a/ssim"]


def size_overrides(args: argparse.Namespace, seed: int) -> list[str]:
    s = args.size
    return [
        f"seed={seed}",
        f"data.size={s}",
        f"data.load_size={s + s // 8}",
        f'data.augment=[{{name="HorizontalFlip",p=0.5}},{{name="Resize",height={s + s // 8},width={s + s // 8}}},'
        f'{{name="RandomCrop",height={s},width={s}}}]',
        f"model.image_size={s}",
        f"model.width={args.width}",
        f"task.dis_width={args.width}",
        f"task.global_layers={args.global_layers}",
        f"task.local_layers={args.local_layers}",
        "optim.default.lr=2e-4",
        f"stages.basic.steps={args.basic_steps}",
        f"stages.transfer.steps={args.transfer_steps}",
        "train.progress=none",
        "train.compile=off",  # as the published study ran (eager)
        "train.sample_every=0",
        f"train.checkpoint_every={args.transfer_steps}",
    ]


def run_method(
    label: str, file: str, extra: list[str], seed: int, args: argparse.Namespace, out: Path
) -> dict:
    key = f"s{seed}-" + "".join(c if c.isalnum() else "_" for c in label)
    run_dir = out / key
    result_file = run_dir / "study.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    overrides = size_overrides(args, seed) + extra
    if file == "cartoon/baseline1_mixed.toml":  # trained from scratch: give it both stages' budget
        overrides.append(f"stages.basic.steps={args.basic_steps + args.transfer_steps}")
    exp = ba.load_experiment(EXAMPLES / file, overrides)
    shared_basic = out / f"s{seed}-basic" / "stages" / "basic" / "final.safetensors"
    uses_shared = file != "cartoon/baseline1_mixed.toml"
    if uses_shared and shared_basic.is_file():
        target = run_dir / "stages" / "basic" / "final.safetensors"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shared_basic, target)
    t0 = time.perf_counter()
    Trainer(exp, run_dir=run_dir, device="cpu").run()
    seconds = time.perf_counter() - t0
    if uses_shared and not shared_basic.is_file():
        shared_basic.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(run_dir / "stages" / "basic" / "final.safetensors", shared_basic)
    report = evaluate_run(run_dir, device="cpu")
    result = {"label": label, "seed": seed, "seconds": seconds, "groups": report["groups"]}
    result_file.write_text(json.dumps(result, indent=1))
    return result


def table(results: list[dict], labels: list[str]) -> str:
    groups = list(results[0]["groups"]) if results else []
    lines = []
    for metric in METRICS:
        lines += [f"\n**{metric}** (mean ± std over seeds; n = seeds)\n", "| method | n | " + " | ".join(groups) + " |",
                  "|---|---:|" + "---:|" * len(groups)]  # fmt: skip
        for label in labels:
            rows = [r for r in results if r["label"] == label]
            if not rows:
                continue
            cells = []
            for g in groups:
                vals = [r["groups"][g][metric] for r in rows if metric in r["groups"].get(g, {})]
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                cells.append(f"{statistics.mean(vals):.3f} ± {sd:.3f}" if vals else "-")
            lines.append(f"| {label} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(
    path: Path, results: list[dict], args: argparse.Namespace, command: str, wall: float
) -> None:
    labels = [m[0] for m in METHODS + SWEEP + INVESTIGATION]
    done = sorted({r["seed"] for r in results})
    text = f"""## Cartoon study: branches with selective back-propagation vs the baselines

Command (re-runnable; finished runs are skipped):

```
{command}
```

Setting: toonfaces (seed 0 data; paper group sizes 1000/200, 75/15, 50/10, 50/10 photos/cartoons),
{args.size} px, generator width {args.width}, discriminators {args.global_layers}/{args.local_layers} layers,
stage 1 (basic model, anchor group only) {args.basic_steps} steps trained once per seed and shared,
transfer stage {args.transfer_steps} steps for every method (baseline 1 trains one model on the pooled data
from scratch for {args.basic_steps}+{args.transfer_steps} steps). Paper losses and weights, Adam 2e-4 (0.5, 0.999),
weight decay 1e-4, one image per group per step. Seeds finished: {done}. Training + evaluation time of all runs in
the tables: {sum(r["seconds"] for r in results) / 60:.0f} min (this invocation: {wall / 60:.1f} min)
on 2 CPU cores (1 torch thread). Metrics on the 100 paired test identities per group:
`a2b/traits` = share of generated cartoons showing exactly the ground-truth traits (toonfaces trait
classifier), `a2b/id` = identity cosine (toonfaces identity encoder) between photo and cartoon,
`ssim`/`l1` against the ground-truth cartoon (a2b) or photo (b2a). Higher is better except l1.
{table(results, labels)}
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--global-layers", type=int, default=5)
    ap.add_argument("--local-layers", type=int, default=4)
    ap.add_argument("--basic-steps", type=int, default=500)
    ap.add_argument("--transfer-steps", type=int, default=150)
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="only the methods whose label starts with one of these (investigation runs: exact label)",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "study")
    ap.add_argument("--results", type=Path, default=ROOT / "docs" / "results_cartoon.md")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    command = "python benchmarks/cartoon_study.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if k not in {"out", "results", "no_sweep", "methods"}
    ) + (" --no-sweep" if args.no_sweep else "")  # fmt: skip
    if args.methods:
        command += " --methods " + " ".join(repr(m) for m in args.methods)
    if args.out != ROOT / "runs" / "study":
        command += f" --out {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}"
    if args.results != ROOT / "docs" / "results_cartoon.md":
        command += f" --results {args.results.relative_to(ROOT) if args.results.is_relative_to(ROOT) else args.results}"
    results: list[dict] = []
    t0 = time.perf_counter()
    for seed in args.seeds:
        for label, file, extra in METHODS + ([] if args.no_sweep else SWEEP) + INVESTIGATION:
            if args.methods and not any(label.startswith(m) for m in args.methods):
                continue
            if (label, file, extra) in INVESTIGATION and not (args.methods and label in args.methods):
                continue
            results.append(run_method(label, file, extra, seed, args, args.out))
            every = [json.loads(p.read_text()) for p in sorted(args.out.glob("*/study.json"))]
            write_results(args.results, every, args, command, time.perf_counter() - t0)
            print(f"seed {seed} {label}: done ({results[-1]['seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
