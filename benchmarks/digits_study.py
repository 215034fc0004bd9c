"""Do per-group branches with selective back-propagation win on few-shot classification (timm + digits)?

For each seed: train the stage-1 model (anchor domain only) once, start every method that builds
on it from that same model, give each method the same transfer budget (150 steps of 64 images),
evaluate per-group accuracy on the held-out test split, and write mean +- std over seeds to
``docs/results_digits.md`` (rewritten after every run; finished runs are skipped on re-run).

    .venv/bin/python benchmarks/digits_study.py --seeds 0 1 2
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
OTHERS_DETACHED = 'stages.transfer.splitter.others="detached"'
#: (label, experiment file, overrides, starts from the shared stage-1 model)
METHODS: list[tuple[str, str, list[str], bool]] = [
    ("basic model (anchor only)", "digits.toml", ["stages.transfer.enabled=false"], True),
    ("one model, all data mixed", "digits/mixed.toml", [], False),
    ("fine-tune all on few-shot", "digits/finetune_all.toml", [], True),
    ("branches, shared frozen for all", "digits/frozen_shared.toml", [], True),
    ("branches, no selective BP", "digits.toml", ['stages.transfer.splitter.others="live"'], True),
    ("branches + selective BP, detached", "digits.toml", [OTHERS_DETACHED], True),
    ("branches + selective BP, frozen (recipe)", "digits.toml", [], True),
    ("recipe + entropy + CORAL", "digits_da.toml", [], True),
]


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_")


def run(method: tuple[str, str, list[str], bool], seed: int, out: Path) -> dict:
    """Train and evaluate one method for one seed (or read the finished result)."""
    label, file, overrides, from_basic = method
    run_dir = out / f"s{seed}" / slug(label)
    done = run_dir / "study.json"
    if done.is_file():
        return json.loads(done.read_text())
    exp = ba.load_experiment(EXAMPLES / file, [f"seed={seed}", "train.progress=none", *overrides])
    basic = out / f"s{seed}" / "basic.safetensors"
    if from_basic and basic.is_file():  # the shared stage-1 model: the trainer skips a finished stage
        (run_dir / "stages" / "basic").mkdir(parents=True, exist_ok=True)
        shutil.copy(basic, run_dir / "stages" / "basic" / "final.safetensors")
    start = time.perf_counter()
    Trainer(exp, run_dir=run_dir, device="cpu").run()
    seconds = time.perf_counter() - start
    if from_basic and not basic.is_file():
        shutil.copy(run_dir / "stages" / "basic" / "final.safetensors", basic)
    groups = evaluate_run(run_dir, device="cpu")["groups"]
    result = {"label": label, "seed": seed, "seconds": round(seconds, 1), "groups": groups}
    done.write_text(json.dumps(result, indent=1))
    return result


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def write(path: Path, results: list[dict], command: str, wall: float) -> None:
    """The results page: mean ± std per group, few-shot mean, and the per-seed few-shot means."""
    groups = list(results[0]["groups"])
    few_shot = groups[1:]
    seeds = sorted({r["seed"] for r in results})
    head = "| method | n | " + " | ".join(groups) + " | few-shot mean | per seed |"
    lines = [head, "|---|---:|" + "---:|" * (len(groups) + 1) + "---|"]
    for label, *_ in METHODS:
        rows = sorted((r for r in results if r["label"] == label), key=lambda r: r["seed"])
        if not rows:
            continue
        cells = [mean_std([r["groups"][g]["accuracy"] for r in rows]) for g in groups]
        few = [statistics.mean(r["groups"][g]["accuracy"] for g in few_shot) for r in rows]
        cells += [f"**{mean_std(few)}**", " / ".join(f"{v:.3f}" for v in few)]
        lines.append(f"| {label} | {len(rows)} | " + " | ".join(cells) + " |")
    compute = sum(r["seconds"] for r in results) / 60
    path.write_text(
        f"""## Digits study (timm plugin set): per-group test accuracy

Command: `{command}` (finished runs are skipped on re-run). Seeds: {seeds}. Wall time of this
invocation {wall / 60:.1f} min; training time of all runs in the table {compute:.1f} min (stage 1
counted once per seed), 2-core CPU shared with other jobs, 1 torch thread.

Setup: `examples/digits.toml` — resnet10t (timm, random init) at 32 px; stage 1: 300 steps of
64 `clean` images; every other method: 150 more steps of 64 images (16 per group, or 48 pooled
few-shot images for fine-tune-all) from that same stage-1 model, except "one model, all data
mixed" (450 steps of 64 pooled images from scratch). Branches = stem + layer1 per group
(`low = 2`). Train: 100 images per class for `clean`, 5 per class for each few-shot domain. Test:
50 per class and domain (500 per group), never trained on. Accuracy, mean ± std over seeds.

{chr(10).join(lines)}
"""
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "digits-study")
    ap.add_argument("--results", type=Path, default=ROOT / "docs" / "results_digits.md")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    command = f".venv/bin/python benchmarks/digits_study.py --seeds {' '.join(map(str, args.seeds))}"
    command += f" --threads {args.threads}" if args.threads != 1 else ""
    results: list[dict] = []
    start = time.perf_counter()
    for seed in args.seeds:
        for method in METHODS:
            results.append(run(method, seed, args.out))
            write(args.results, results, command, time.perf_counter() - start)
            print(f"seed {seed} {method[0]}: {results[-1]['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
