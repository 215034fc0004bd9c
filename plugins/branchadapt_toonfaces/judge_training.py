"""Training and held-out evaluation of the toonfaces judges (see ``judges.py``).

``python -m branchadapt_toonfaces.judges train [--out DIR] [--seed 0]`` renders paired photos and
cartoons of the judges' ``fit`` stream in memory, trains both judges on one CPU thread, measures
them on the ``val`` stream and on the data set's test split (neither is trained on), and writes
``<name>.safetensors`` + ``<name>.json`` to ``--out`` (default: the package's ``weights/``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from .dataset import identity_seed, render_seeded
from .identity import GROUPS, sample_identity
from .judges import (
    INPUT_SIZE,
    TRAIN_COMMAND,
    TRAITS,
    WEIGHTS_DIR,
    IdentityEncoder,
    JudgeOptions,
    TraitClassifier,
    judge_identity_seed,
    predict_traits,
    trait_accuracy,
    trait_labels,
)


@dataclass
class Pairs:
    """Paired photos and cartoons (uint8, N x 3 x S x S) with group index and trait labels."""

    photos: Tensor
    cartoons: Tensor
    groups: Tensor
    traits: Tensor

    def __len__(self) -> int:
        return len(self.groups)


def render_pairs(seeds: list[tuple[int, str]], size: int) -> Pairs:
    """Render the photo and the cartoon of each (identity seed, group)."""
    photos, cartoons, groups, traits = [], [], [], []
    for s, group in seeds:
        photos.append(render_seeded(s, group, "photo", size))
        cartoons.append(render_seeded(s, group, "cartoon", size))
        groups.append(GROUPS.index(group))
        traits.append(trait_labels(sample_identity(group, np.random.default_rng(s))))

    def stack(images: list[np.ndarray]) -> Tensor:
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()

    return Pairs(stack(photos), stack(cartoons), torch.tensor(groups), torch.stack(traits))


def judge_pairs(seed: int, stream: str, per_group: int, size: int = INPUT_SIZE) -> Pairs:
    """``per_group`` identities of each group from a judge stream (``fit`` or ``val``)."""
    seeds = [(judge_identity_seed(seed, stream, g, i), g) for i in range(per_group) for g in GROUPS]
    return render_pairs(seeds, size)


def test_split_pairs(seed: int, per_group: int, size: int = INPUT_SIZE) -> Pairs:
    """The first ``per_group`` paired identities of each group of the data set's test split."""
    seeds = [(identity_seed(seed, "test", g, "photo", i), g) for i in range(per_group) for g in GROUPS]
    return render_pairs(seeds, size)


def soften(images: Tensor, sigma: float = 1.5) -> Tensor:
    """A fixed, GAN-like degradation (Gaussian blur and a colour cast) of uint8 images."""
    k = torch.arange(-4, 5, dtype=torch.float32)
    g = torch.exp(-(k**2) / (2 * sigma**2))
    g = (g / g.sum()).view(1, 1, 1, 9).repeat(3, 1, 1, 1)
    x = F.conv2d(F.pad(images.float(), (4, 4, 0, 0), mode="replicate"), g, groups=3)
    x = F.conv2d(F.pad(x, (0, 0, 4, 4), mode="replicate"), g.transpose(2, 3), groups=3)
    x = x * torch.tensor([1.08, 0.95, 1.0]).view(1, 3, 1, 1) + 6
    return x.clamp(0, 255).round().to(torch.uint8)


def as_float(x: Tensor) -> Tensor:
    return x.float() / 127.5 - 1.0


def augment(x: Tensor, gen: torch.Generator, flip: bool = False) -> Tensor:
    """Light, label-preserving jitter: pose, blur (GAN-like softness), colour, noise."""
    b = x.shape[0]

    def u(lo: float, hi: float, *shape: int) -> Tensor:
        return lo + (hi - lo) * torch.rand(b, *shape, generator=gen)

    angle, scale = u(-4, 4) * math.pi / 180, u(0.94, 1.06)
    cos, sin = scale * torch.cos(angle), scale * torch.sin(angle)
    theta = torch.stack(
        [torch.stack([cos, -sin, u(-0.05, 0.05)], 1), torch.stack([sin, cos, u(-0.05, 0.05)], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    if flip:
        x = torch.where(torch.rand(b, 1, 1, 1, generator=gen) < 0.5, x.flip(-1), x)
    soft = u(0, 1, 1, 1, 1) * (torch.rand(b, 1, 1, 1, generator=gen) < 0.4)
    x = x + soft * (F.avg_pool2d(x, 3, 1, 1, count_include_pad=False) - x)
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * u(0.85, 1.15, 1, 1, 1) + mean + u(-0.08, 0.08, 1, 1, 1) + u(-0.04, 0.04, 3, 1, 1)
    x = x + torch.randn(x.shape, generator=gen) * u(0, 0.04, 1, 1, 1)
    return x.clamp(-1, 1)


def _fit(
    model: nn.Module,
    n: int,
    epochs: int,
    batch: int,
    lr: float,
    gen: torch.Generator,
    step_loss: Callable[[Tensor], Tensor],
) -> list[float]:
    """AdamW with a cosine schedule over shuffled mini-batches; returns the mean loss per epoch."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps = epochs * (n // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    history = []
    for _ in range(epochs):
        perm, total = torch.randperm(n, generator=gen), 0.0
        for k in range(n // batch):
            loss = step_loss(perm[k * batch : (k + 1) * batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
        history.append(round(total / max(1, n // batch), 4))
    return history


def train_identity_encoder(
    data: Pairs, seed: int, epochs: int, batch: int = 128
) -> tuple[IdentityEncoder, list[float]]:
    """Symmetric InfoNCE over paired photo/cartoon batches (the other pairs are the negatives)."""
    torch.manual_seed(seed)
    model = IdentityEncoder(JudgeOptions(random_init=True))
    gen = torch.Generator().manual_seed(seed + 1)
    target = torch.arange(batch)

    def step_loss(idx: Tensor) -> Tensor:
        photos = augment(as_float(data.photos[idx]), gen)
        cartoons = augment(as_float(data.cartoons[idx]), gen)
        z = model(torch.cat([photos, cartoons]))
        logits = z[:batch] @ z[batch:].T / 0.1
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))

    return model.eval(), _fit(model, len(data), epochs, batch, 3e-3, gen, step_loss)


def train_trait_classifier(
    data: Pairs, seed: int, epochs: int, batch: int = 128
) -> tuple[TraitClassifier, list[float]]:
    """Binary cross-entropy of each trait on (augmented, flipped) cartoons."""
    torch.manual_seed(seed)
    model = TraitClassifier(JudgeOptions(random_init=True))
    gen = torch.Generator().manual_seed(seed + 2)

    def step_loss(idx: Tensor) -> Tensor:
        x = augment(as_float(data.cartoons[idx]), gen, flip=True)
        return F.binary_cross_entropy_with_logits(model(x), data.traits[idx])

    return model.eval(), _fit(model, len(data), epochs, batch, 3e-3, gen, step_loss)


@torch.no_grad()
def _embed(model: IdentityEncoder, images: Tensor) -> Tensor:
    return torch.cat([model(as_float(images[i : i + 256])) for i in range(0, len(images), 256)])


@torch.no_grad()
def identity_metrics(model: IdentityEncoder, data: Pairs) -> dict[str, float]:
    """Photo->cartoon retrieval top-1 among all candidates and within the photo's group, and
    the share of (photo, other cartoon) pairs whose cosine is below the true pair's."""
    model.eval()
    sim = _embed(model, data.photos) @ _embed(model, data.cartoons).T
    n, true = len(sim), sim.diagonal()
    same_group = data.groups[:, None] == data.groups[None, :]
    in_group = sim.masked_fill(~same_group, -2.0)
    off = ~torch.eye(n, dtype=torch.bool)
    return {
        "candidates": n,
        "top1_all": float((sim.argmax(1) == torch.arange(n)).float().mean()),
        "top1_in_group": float((in_group.argmax(1) == torch.arange(n)).float().mean()),
        "pair_win_rate": float((true[:, None] > sim)[off].float().mean()),
        "mean_cos_same": float(true.mean()),
        "mean_cos_other": float(sim[off].mean()),
    }


def trait_metrics(model: TraitClassifier, data: Pairs) -> dict[str, float]:
    """Trait accuracy (exact and per trait) on ground-truth cartoons."""
    model.eval()
    return trait_accuracy(predict_traits(model, as_float(data.cartoons)), data.traits)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_judge(model: nn.Module, out: Path, name: str, sidecar: dict[str, Any]) -> Path:
    """Atomically write ``name.safetensors`` and its JSON sidecar into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.safetensors"
    tmp = out / f".{name}.{os.getpid()}.tmp"
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    # a single metadata key: safetensors writes several in hash order, which breaks byte-identity
    save_file(state, str(tmp), metadata={"format": f"branchadapt_toonfaces.judges.{type(model).__name__}"})
    tmp.chmod(0o644)
    os.replace(tmp, path)
    meta = {
        **sidecar,
        "file": path.name,
        "sha256": _sha256(path),
        "parameters": sum(v.numel() for v in model.parameters()),
    }
    (out / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return path


DEFAULTS = {"per_group": 750, "id_epochs": 5, "trait_epochs": 4, "val_per_group": 50}


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces these weights (non-default settings spelled out)."""
    parts = [TRAIN_COMMAND, f"--seed {args.seed}"]
    parts += [
        f"--{k.replace('_', '-')} {getattr(args, k)}" for k, v in DEFAULTS.items() if getattr(args, k) != v
    ]
    return " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m branchadapt_toonfaces.judges", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train both judges and write their weights and sidecars")
    tr.add_argument(
        "--out", type=Path, default=WEIGHTS_DIR, help="output folder (default: the package's weights/)"
    )
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument(
        "--per-group", type=int, default=DEFAULTS["per_group"], help="training identities per group"
    )
    tr.add_argument("--id-epochs", type=int, default=DEFAULTS["id_epochs"])
    tr.add_argument("--trait-epochs", type=int, default=DEFAULTS["trait_epochs"])
    tr.add_argument(
        "--val-per-group", type=int, default=DEFAULTS["val_per_group"], help="held-out identities per group"
    )
    args = ap.parse_args(argv)

    torch.set_num_threads(1)  # one core, and bit-reproducible
    torch.use_deterministic_algorithms(True)
    t0 = time.perf_counter()
    fit = judge_pairs(args.seed, "fit", args.per_group)
    held_out = {
        "val_64px": judge_pairs(args.seed, "val", args.val_per_group),
        "val_128px": judge_pairs(args.seed, "val", args.val_per_group, size=128),
        "testsplit_seed0_64px": test_split_pairs(0, args.val_per_group),
    }
    v = held_out["val_128px"]
    held_out["val_128px_softened"] = Pairs(v.photos, soften(v.cartoons), v.groups, v.traits)
    print(f"rendered {len(fit)} training pairs and the held-out sets in {time.perf_counter() - t0:.1f} s")
    common = {
        "input_size": INPUT_SIZE,
        "input_range": [-1.0, 1.0],
        "command": _command(args),
        "seed": args.seed,
        "training_identities": {"stream": "judge:fit", "per_group": args.per_group, "groups": list(GROUPS)},
        "held_out_sets": {
            "val_64px / val_128px": f"judge:val stream, {args.val_per_group} identities per group, "
            "rendered at 64 / 128 px",
            "val_128px_softened": "val_128px with the cartoons blurred (sigma 1.5 px) and colour-cast",
            "testsplit_seed0_64px": f"the data set's test split (seed 0), first {args.val_per_group} pairs per group",
        },
        "torch": torch.__version__,
    }

    t1 = time.perf_counter()
    encoder, history = train_identity_encoder(fit, args.seed, args.id_epochs)
    id_meta = {
        "embedding_dim": IdentityEncoder.embedding_dim,
        "epochs": args.id_epochs,
        "loss_per_epoch": history,
    }
    id_meta["train_seconds"] = round(time.perf_counter() - t1, 1)
    id_meta["held_out_metrics"] = {k: _rounded(identity_metrics(encoder, v)) for k, v in held_out.items()}
    _report(
        save_judge(encoder, args.out, "identity_encoder", {"model": "IdentityEncoder", **common, **id_meta})
    )

    t1 = time.perf_counter()
    classifier, history = train_trait_classifier(fit, args.seed, args.trait_epochs)
    tr_meta = {"traits": list(TRAITS), "epochs": args.trait_epochs, "loss_per_epoch": history}
    tr_meta["train_seconds"] = round(time.perf_counter() - t1, 1)
    tr_meta["held_out_metrics"] = {k: _rounded(trait_metrics(classifier, v)) for k, v in held_out.items()}
    _report(
        save_judge(
            classifier, args.out, "trait_classifier", {"model": "TraitClassifier", **common, **tr_meta}
        )
    )
    print(f"total {time.perf_counter() - t0:.1f} s")
    return 0


def _rounded(metrics: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in metrics.items()}


def _report(path: Path) -> None:
    meta = json.loads(path.with_suffix(".json").read_text())
    print(f"{meta['model']}: trained in {meta['train_seconds']} s, loss per epoch {meta['loss_per_epoch']}")
    for name, metrics in meta["held_out_metrics"].items():
        print(f"  {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    print(f"  wrote {path}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
