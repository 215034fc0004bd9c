"""One training step of the two-direction translator (U-GAT-IT / photo2cartoon).

Modules: ``gen_a2b`` and ``gen_b2a`` (the configured backbone: branched by the engine) and four
discriminators ``dis_ga``/``dis_la`` (global/local, photo domain A) and ``dis_gb``/``dis_lb``
(cartoon domain B); the global ones carry the group-classification head.

Phases, in order: ``discriminator`` then ``generator``. By default the generators run once per
step: the translations computed for the discriminator update are reused (graph kept) by the
generator update, which is exact because the generators do not change in between; the reference
implementation computes them twice (``reuse_fakes = false`` reproduces that order).

Outputs read by the loss terms: ``d_real``/``d_fake`` (discriminator outputs by name GA, LA, GB,
LB), ``groups``/``fake_groups`` (group ids per domain A/B of the real images and of the fakes),
and in the generator phase ``real_a, real_b, fake_a, fake_b, rec_a, rec_b, id_a, id_b`` and
``cam`` (generator CAM logits ``a2b, b2b, b2a, a2a``).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import Field, field_validator
from torch import Tensor, nn

import branchadapt as ba
from branchadapt import Phase, PluginOptions, Task
from branchadapt.compiling import has_compiled
from branchadapt.concurrency import concurrency_applies, run_concurrently
from branchadapt.data import first_input
from branchadapt.distributed import from_env
from branchadapt.errors import naming
from branchadapt.paramslots import ParamSlots

from .critics import Discriminator
from .recognizers import check_recognizer

GENERATORS = ("gen_a2b", "gen_b2a")
DISCRIMINATORS = {"GA": "dis_ga", "LA": "dis_la", "GB": "dis_gb", "LB": "dis_lb"}
CLAMPED = ("rho", "w_gamma", "w_beta")


class TranslateOptions(PluginOptions):
    dis_width: int = Field(32, ge=1, description="base width of the discriminators")
    global_layers: int = Field(
        7,
        ge=3,
        description="layers of the global discriminators (n layers need >= 3 * 2**(n - 2) px: 7 need 96)",
    )
    local_layers: int = Field(5, ge=3, description="layers of the local discriminators")
    group_head: bool = Field(True, description="group-classification head on the global discriminators")
    reuse_fakes: bool = Field(
        True, description="run the generators once per step (exact); false: as the reference"
    )
    concurrent: bool | Literal["auto"] = Field(
        "auto",
        description="run the two directions' generators and discriminators at once, each on its own "
        "thread, splitting the backward pass where they meet (exact); auto: on CPU with >= 2 threads",
    )
    clamp: bool = Field(True, description="clamp rho / w_gamma / w_beta to [0, 1] after each generator step")
    sample_count: int = Field(4, ge=1, description="images per group in the training sample grids")
    eval_recognizer: dict[str, Any] | None = Field(
        default_factory=lambda: {"type": "toonfaces_id"},
        description="recognizer for the identity metric of evaluate; none to skip",
    )
    eval_traits: bool = Field(
        True, description="trait accuracy with the toonfaces trait classifier (toonfaces groups)"
    )

    @field_validator("eval_recognizer")
    @classmethod
    def _recognizer(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        """Checked as the experiment loads, not after training (:func:`.recognizers.check_recognizer`)."""
        return check_recognizer(value)

    photo2cartoon: Path | None = Field(
        None,
        description="start from a photo2cartoon checkpoint (genA2B[, genB2A, dis*]); read by the stages "
        "without init_from only (not by later stages or inference)",
    )


class Translate(Task):
    """Photo <-> cartoon translation with two generators and four discriminators."""

    Options = TranslateOptions
    options: TranslateOptions

    def __init__(self, options: PluginOptions | None, context: ba.TaskContext) -> None:
        super().__init__(options, context)
        self._clamp_slots: weakref.WeakKeyDictionary[nn.Module, ParamSlots] = weakref.WeakKeyDictionary()
        self._concurrent = False  # decided by each forward (device, threads, distributed, compiled)
        if self.options.concurrent is True:  # refused under torchrun before a run writes anything
            concurrency_applies(
                True, torch.device("cpu"), distributed=from_env().enabled, name="task.concurrent"
            )
        self._compiled: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()

    def build(self) -> dict[str, nn.Module]:
        o = self.options
        groups = len(self.context.groups) if o.group_head else 0
        modules: dict[str, nn.Module] = {name: self.context.build_backbone() for name in GENERATORS}
        for key, name in DISCRIMINATORS.items():
            layers = o.global_layers if key[0] == "G" else o.local_layers
            modules[name] = Discriminator(
                width=o.dis_width, n_layers=layers, n_groups=groups if key[0] == "G" else 0
            )
        if o.photo2cartoon is not None and self.context.initial_weights:  # not read to be overwritten
            from .photo2cartoon import import_weights

            with naming("task.photo2cartoon"):  # the file is the experiment's: name its key
                import_weights(o.photo2cartoon, modules)
        return modules

    def phases(self) -> list[Phase]:
        return [Phase("discriminator", tuple(DISCRIMINATORS.values())), Phase("generator", GENERATORS)]

    # ------------------------------------------------------------------ step
    def translate(self, modules: Mapping[str, nn.Module], batch: ba.Batch) -> dict[str, Any]:
        """Both generators on both domains at once (instance-normalised nets: batching is exact).

        ``raw`` keeps each generator's whole (image, CAM logits) output for a split backward pass."""
        real_a, ga = batch["photo"]["image"], batch["photo"]["group"]
        real_b, gb = batch["cartoon"]["image"], batch["cartoon"]["group"]
        na = real_a.shape[0]
        nb = real_b.shape[0]
        a2b, b2a = self._maybe_concurrent(
            lambda: modules["gen_a2b"](torch.cat([real_a, real_b]), groups=torch.cat([ga, gb]))[:2],
            lambda: modules["gen_b2a"](torch.cat([real_b, real_a]), groups=torch.cat([gb, ga]))[:2],
        )
        (img, cam), (img2, cam2) = a2b, b2a
        fake_b, id_b, cam_a2b, cam_b2b = img[:na], img[na:], cam[:na], cam[na:]
        fake_a, id_a, cam_b2a, cam_a2a = img2[:nb], img2[nb:], cam2[:nb], cam2[nb:]
        return {
            "real_a": real_a, "real_b": real_b, "fake_a": fake_a, "fake_b": fake_b, "id_a": id_a, "id_b": id_b,
            "cam_a2b": cam_a2b, "cam_b2b": cam_b2b, "cam_b2a": cam_b2a, "cam_a2a": cam_a2a,
            "raw": {"a2b": (img, cam), "b2a": (img2, cam2)},
        }  # fmt: skip

    def _maybe_concurrent(self, *calls: Any) -> list[Any]:
        return run_concurrently(calls) if self._concurrent else [call() for call in calls]

    def forward(
        self, phase: str, modules: Mapping[str, nn.Module], batch: ba.Batch, scratch: dict[str, Any]
    ) -> dict[str, Any]:
        ga, gb = batch["photo"]["group"], batch["cartoon"]["group"]
        groups = {"A": ga, "B": gb}
        fake_groups = {"A": gb, "B": ga}  # fake_a comes from cartoons, fake_b from photos
        distributed = dist.is_available() and dist.is_initialized()
        device = batch["photo"]["image"].device
        compiled = self._compiled.get(modules["gen_a2b"])
        if compiled is None:  # a stage's modules are compiled (or not) before its first step
            compiled = self._compiled[modules["gen_a2b"]] = any(has_compiled(m) for m in modules.values())
        self._concurrent = concurrency_applies(
            self.options.concurrent,
            device,
            distributed=distributed,
            compiled=compiled,
            name="task.concurrent",
        )
        if phase == "discriminator":
            if self.options.reuse_fakes:
                scratch["fakes"] = t = self.translate(modules, batch)
            else:
                with torch.no_grad():
                    t = self.translate(modules, batch)

            def judge(domain: str) -> dict[str, Tensor]:
                real, fake = (t["real_a"], t["fake_a"]) if domain == "A" else (t["real_b"], t["fake_b"])
                both = torch.cat([real, fake.detach()])
                return {k: modules[n](both) for k, n in DISCRIMINATORS.items() if k[1] == domain}

            outs = {
                k: v
                for d in self._maybe_concurrent(lambda: judge("A"), lambda: judge("B"))
                for k, v in d.items()
            }
            if self._concurrent:
                scratch["cut"] = [[outs["GA"], outs["LA"]], [outs["GB"], outs["LB"]]]
            d_real, d_fake = {}, {}
            for key, out in outs.items():
                n = (t["real_a"] if key[1] == "A" else t["real_b"]).shape[0]
                d_real[key], d_fake[key] = out.split(n)
            return {"d_real": d_real, "d_fake": d_fake, "groups": groups, "fake_groups": fake_groups}
        t = scratch.pop("fakes", None) or self.translate(modules, batch)
        # Each fake feeds one cycle and its domain's discriminators. With a split backward they
        # start from a leaf copy of it: their gradient reaches the translation in a later stage.
        fake_a, fake_b = t["fake_a"], t["fake_b"]
        if self._concurrent:
            fake_a, fake_b = fake_a.detach().requires_grad_(), fake_b.detach().requires_grad_()

        def consume(fake: Tensor, cycle: str, groups: Tensor, domain: str) -> tuple[Tensor, dict[str, Any]]:
            rec = modules[cycle](fake, groups=groups)[0]
            return rec, {k: modules[n](fake) for k, n in DISCRIMINATORS.items() if k[1] == domain}

        dis = [modules[n] for n in DISCRIMINATORS.values()]
        flags = [[p.requires_grad for p in d.parameters()] for d in dis]
        for d in dis:  # D's parameters need no gradient in the generator phase
            d.requires_grad_(False)
        try:
            (rec_a, judged_b), (rec_b, judged_a) = self._maybe_concurrent(
                lambda: consume(fake_b, "gen_b2a", ga, "B"), lambda: consume(fake_a, "gen_a2b", gb, "A")
            )
        finally:
            for d, fl in zip(dis, flags, strict=True):
                for p, f in zip(d.parameters(), fl, strict=True):
                    p.requires_grad_(f)
        d_fake = {**judged_a, **judged_b}
        if self._concurrent:
            scratch["cycles"] = {
                "ends": ([rec_a, *_tensors(judged_b)], [rec_b, *_tensors(judged_a)]),
                "starts": (fake_b, fake_a),
                "raw": t["raw"],
            }
        cam = {"a2b": t["cam_a2b"], "b2b": t["cam_b2b"], "b2a": t["cam_b2a"], "a2a": t["cam_a2a"]}
        t = {k: v for k, v in t.items() if k != "raw"}
        return {**t, "rec_a": rec_a, "rec_b": rec_b, "cam": cam, "d_fake": d_fake,
                "groups": groups, "fake_groups": fake_groups}  # fmt: skip

    def backward(self, phase: str, loss: Tensor, scratch: dict[str, Any]) -> None:
        """``loss.backward()``, or with ``concurrent``: in stages that run each direction's part at once.

        First the loss's gradient at the tensors where the parts meet, then the parts at once:
        discriminator phase, the A-side and the B-side discriminators; generator phase, for each
        fake image its cycle and its domain's discriminators (down to a leaf copy of the fake),
        then both translations, each with the gradient its fake's leaf collected added."""
        if not self._concurrent:
            loss.backward()
            return
        if phase == "discriminator":
            sides = [_tensors(side) for side in scratch.pop("cut")]
            self._backward_both(loss, sides)
            return
        cycles = scratch.pop("cycles")
        (start_b, start_a), raw = cycles["starts"], cycles["raw"]
        ends = [list(raw["a2b"]), list(raw["b2a"])]
        g_ends = self._backward_both(loss, list(cycles["ends"]), keep=ends)
        for i, start in enumerate((start_b, start_a)):
            if start.grad is not None:  # the cycle's and discriminators' gradient at the fake rows
                extra = torch.zeros_like(ends[i][0])
                extra[: start.shape[0]] = start.grad
                g_img = g_ends[i][0]
                g_ends[i][0] = extra if g_img is None else g_img + extra
        self._run_both(ends, g_ends)

    def _backward_both(
        self, loss: Tensor, sides: list[list[Tensor]], keep: list[list[Tensor]] | None = None
    ) -> list[list[Tensor | None]]:
        """The loss's gradient at every tensor of ``sides`` and ``keep`` (None where it does not
        reach), then both sides' backward passes at once; returns the gradients at ``keep``."""
        keep = keep or [[], []]
        groups = [*sides, *keep]
        flat = [t for group in groups for t in group if t.requires_grad]
        found = iter(torch.autograd.grad(loss, flat, allow_unused=True))
        grads = [[next(found) if t.requires_grad else None for t in group] for group in groups]
        self._run_both(sides, grads[:2])
        return grads[2:]

    def _run_both(self, tensors: list[list[Tensor]], grads: list[list[Tensor | None]]) -> None:
        def one(i: int) -> None:
            pairs = [(t, g) for t, g in zip(tensors[i], grads[i], strict=True) if g is not None]
            if pairs:
                torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])

        run_concurrently([lambda: one(0), lambda: one(1)])

    def after_step(self, phase: str, modules: Mapping[str, nn.Module]) -> None:
        if phase != "generator" or not self.options.clamp:
            return
        with torch.no_grad():
            for name in GENERATORS:
                for p in self._clamped(modules[name]).tensors():
                    p.clamp_(0.0, 1.0)

    def _clamped(self, module: nn.Module) -> ParamSlots:
        """The parameters of ``module`` clamped after each generator step, found once per module."""
        slots = self._clamp_slots.get(module)
        if slots is None:
            slots = ParamSlots(module, keep=lambda n: n.rsplit(".", 1)[-1] in CLAMPED)
            self._clamp_slots[module] = slots
        return slots

    def example_inputs(
        self, module: str, source: ba.DataSource, batch_size: int = 2
    ) -> tuple[Tensor, ...] | None:
        """The first training photo of the first group with data (else its first cartoon),
        repeated: every module here takes images, so a run refuses a model built for another size
        (model.image_size, task.global_layers) before it trains, and export traces at the data's
        size."""
        x = first_input(source, self.context.groups, ["photo", "cartoon"], "image", batch_size)
        return None if x is None else (x,)

    # ------------------------------------------------------------------ artefacts
    def samples(
        self,
        modules: Mapping[str, nn.Module],
        source: ba.DataSource,
        device: torch.device,
        out_dir: Path,
        step: int,
    ) -> list[Path]:
        from .sampling import write_training_grids

        return write_training_grids(self, modules, source, device, out_dir, step)

    def evaluate(
        self,
        modules: Mapping[str, nn.Module],
        source: ba.DataSource,
        device: torch.device,
        out_dir: Path | None = None,
    ) -> dict[str, dict[str, float]]:
        from .evaluation import evaluate_translation

        return evaluate_translation(self, modules, source, device, out_dir)


def _tensors(outputs: Any) -> list[Tensor]:
    """The tensors in a discriminator's outputs (DOut tuples, possibly in a dict or list)."""
    if isinstance(outputs, Tensor):
        return [outputs]
    if isinstance(outputs, Mapping):
        outputs = list(outputs.values())
    return [t for item in outputs if item is not None for t in _tensors(item)]
