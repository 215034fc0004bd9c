"""One training iteration of the photo2cartoon reference code, timed on this machine.

Needs a checkout of https://github.com/minivision-ai/photo2cartoon (nothing is downloaded here):
the script imports ``models/networks.py`` and ``models/mobilefacenet.py`` from it and runs, on
random [-1, 1] tensors, the iteration of its training script as documented in
``../shared/reference/photo2cartoon.md``: discriminator update on freshly computed translations
(not detached, so the discriminator loss also back-propagates into both generators), then the
generator update with every translation recomputed, five losses (adversarial, cycle, identity, CAM,
face-ID through a MobileFaceNet), Adam on both, rho/w clipping. The MobileFaceNet is randomly
initialised (its weights are not needed for timing; its parameters keep ``requires_grad`` as in
the reference).

    .venv/bin/python benchmarks/reference_step.py --repo /path/to/photo2cartoon --sizes 128 256

``step_time.py --reference-repo PATH`` times this next to our step in the same run.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import statistics
import sys
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F


def _load(path: Path, name: str) -> ModuleType:
    if not path.is_file():
        sys.exit(f"error: {path} not found; --repo must be a photo2cartoon checkout (models/{path.name})")
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    warnings.filterwarnings("ignore", message=".*upsample.* is deprecated")
    spec.loader.exec_module(module)
    return module


class ReferenceStep:
    """The reference iteration at ``size`` px and width ``ch`` (batch: 1 photo + 1 cartoon)."""

    def __init__(self, repo: Path, size: int, ch: int = 32, seed: int = 0) -> None:
        nets = _load(repo / "models" / "networks.py", "p2c_networks")
        facenet = _load(repo / "models" / "mobilefacenet.py", "p2c_mobilefacenet")
        torch.manual_seed(seed)
        self.gen_a2b = nets.ResnetGenerator(ngf=ch, img_size=size, light=True)
        self.gen_b2a = nets.ResnetGenerator(ngf=ch, img_size=size, light=True)
        self.dis = {k: nets.Discriminator(input_nc=3, ndf=ch, n_layers=n) for k, n in (("GA", 7), ("GB", 7), ("LA", 5), ("LB", 5))}  # fmt: skip
        self.face = facenet.MobileFaceNet(512).eval()
        gens = itertools.chain(self.gen_a2b.parameters(), self.gen_b2a.parameters())
        diss = itertools.chain(*(d.parameters() for d in self.dis.values()))
        adam = {"lr": 1e-4, "betas": (0.5, 0.999), "weight_decay": 1e-4}
        self.g_optim = torch.optim.Adam(gens, **adam)  # type: ignore[arg-type]
        self.d_optim = torch.optim.Adam(diss, **adam)  # type: ignore[arg-type]
        self.clippers = (nets.RhoClipper(0, 1), nets.WClipper(0, 1))
        self.size = size

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.rand(1, 3, self.size, self.size) * 2 - 1, torch.rand(1, 3, self.size, self.size) * 2 - 1

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:]
        top, bottom = int(h / 2.1 * (0.8 - 0.33)), int(h - h / 2.1 * 0.3)
        left = int(w / 2 - (bottom - top) / 2)
        crop = x[:, :, top:bottom, left : left + bottom - top]
        return self.face(F.interpolate(crop, size=[112, 112], mode="bilinear", align_corners=True))

    def _id_distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (1 - torch.cosine_similarity(self._features(a), self._features(b))).mean()

    def __call__(self, real_a: torch.Tensor, real_b: torch.Tensor) -> float:
        mse = lambda x, t: F.mse_loss(x, torch.full_like(x, t))  # noqa: E731
        bce = lambda x, t: F.binary_cross_entropy_with_logits(x, torch.full_like(x, t))  # noqa: E731
        d = self.dis
        self.d_optim.zero_grad()
        fake_a2b, _, _ = self.gen_a2b(real_a)
        fake_b2a, _, _ = self.gen_b2a(real_b)
        d_loss = real_a.new_zeros(())
        for key, real, fake in (("GA", real_a, fake_b2a), ("LA", real_a, fake_b2a), ("GB", real_b, fake_a2b), ("LB", real_b, fake_a2b)):  # fmt: skip
            real_logit, real_cam, _ = d[key](real)
            fake_logit, fake_cam, _ = d[key](fake)
            d_loss = d_loss + mse(real_logit, 1) + mse(fake_logit, 0) + mse(real_cam, 1) + mse(fake_cam, 0)
        d_loss.backward()
        self.d_optim.step()

        self.g_optim.zero_grad()
        fake_a2b, a2b_cam, _ = self.gen_a2b(real_a)
        fake_b2a, b2a_cam, _ = self.gen_b2a(real_b)
        fake_a2b2a, _, _ = self.gen_b2a(fake_a2b)
        fake_b2a2b, _, _ = self.gen_a2b(fake_b2a)
        fake_a2a, a2a_cam, _ = self.gen_b2a(real_a)
        fake_b2b, b2b_cam, _ = self.gen_a2b(real_b)
        g_loss = real_a.new_zeros(())
        for key, fake in (("GA", fake_b2a), ("LA", fake_b2a), ("GB", fake_a2b), ("LB", fake_a2b)):
            logit, cam, _ = d[key](fake)
            g_loss = g_loss + mse(logit, 1) + mse(cam, 1)
        g_loss = g_loss + 50 * (F.l1_loss(fake_a2b2a, real_a) + F.l1_loss(fake_b2a2b, real_b))
        g_loss = g_loss + 10 * (F.l1_loss(fake_a2a, real_a) + F.l1_loss(fake_b2b, real_b))
        g_loss = g_loss + 1000 * (bce(b2a_cam, 1) + bce(a2a_cam, 0) + bce(a2b_cam, 1) + bce(b2b_cam, 0))
        g_loss = g_loss + self._id_distance(real_a, fake_a2b) + self._id_distance(real_b, fake_b2a)
        g_loss.backward()
        self.g_optim.step()
        for clipper in self.clippers:
            self.gen_a2b.apply(clipper)
            self.gen_b2a.apply(clipper)
        return float(g_loss.detach())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, required=True, help="photo2cartoon checkout")
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.steps} after {args.warmup}")
    print("| size | reference iteration (s) |\n|---:|---:|")
    for size in args.sizes:
        step = ReferenceStep(args.repo, size)
        times = []
        for i in range(args.warmup + args.steps):
            a, b = step.batch()
            start = time.perf_counter()
            step(a, b)
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
        print(f"| {size} | {statistics.median(times):.3f} |", flush=True)


if __name__ == "__main__":
    main()
