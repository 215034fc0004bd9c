"""torch's CPU kernels against the cartoon plugins' replacements, op by op, on the step's map shapes.

- reflection-pad gradient: ``aten.reflection_pad2d_backward`` against
  ``branchadapt_cartoon.padding.reflect_pad_backward`` (one strided copy of the interior plus the
  mirrored rows, columns and corners);
- instance-norm training forward: ``aten.native_batch_norm`` on ``(1, B*C, H, W)`` (what
  ``nn.InstanceNorm2d`` runs) against ``branchadapt_cartoon.instnorm.norm_stats`` (mean,
  subtraction, vector norm, scaling);
- (a third table) the instance-norm backward of channels_last maps, torch's per-sample batch-norm
  kernel against ``instnorm.plain_norm_backward`` (used up to ``PLAIN_BACKWARD_MAX_CHANNELS``
  channels with two or more threads), and the layer-instance norms' statistics, ``torch.var_mean``
  over the spatial dimensions against ``instnorm.var_mean_hw``, forward and backward.

Shapes are those of the photo2cartoon generator at width 32 (the hourglass units' 8-32 channels
at full and half resolution, the 128-channel bottleneck), batch 1 and 2; median of ``--repeat``
calls after two warm-up calls, the two implementations interleaved. Both replacements apply only
from 65,536 elements (``FOLD_MIN_NUMEL``, ``FAST_MIN_NUMEL``); the rows below that show why.

A second table times the generator's 3x3 convolutions (already padded input, forward and backward
to input and weight) through oneDNN, torch's default on a CPU, against torch's own im2col kernel
(``aten.thnn_conv2d``), the alternative for small-channel maps whose oneDNN backward spends much
of its time reordering layouts, and against oneDNN on channels_last maps and weights
(``model.channels_last``). The grouped rows are three folded branch copies (``groups = 3``,
channels per copy), which the im2col kernel does not take.

    .venv/bin/python benchmarks/kernels.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from branchadapt_cartoon import instnorm, padding

# (batch, in channels, out channels, size, groups); channels per group
CONVS = [(2, 32, 16, 128, 1), (2, 16, 8, 128, 1), (2, 8, 8, 128, 1), (2, 32, 16, 64, 1), (2, 64, 32, 64, 1),
         (2, 128, 128, 32, 1), (2, 3, 32, 128, 1), (1, 32, 16, 128, 3), (1, 8, 8, 128, 3)]  # fmt: skip
SHAPES = [(2, 32, 256, 256), (2, 8, 256, 256), (1, 32, 128, 128), (2, 32, 128, 128), (2, 128, 64, 64),
          (1, 128, 32, 32), (1, 16, 32, 32), (2, 8, 16, 16)]  # fmt: skip


def median_ms(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Median milliseconds per call of each function, calls interleaved."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(2):
        for f in fns.values():
            f()
    for _ in range(repeat):
        for name, f in fns.items():
            start = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - start)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    aten = torch.ops.aten
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeat} calls (ms)\n")
    print("| input shape | MiB | pad grad: torch | pad grad: fold | torch / fold "
          "| IN forward: torch | IN forward: ours | torch / ours |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    torch.manual_seed(0)
    for b, c, h, w in SHAPES:
        x = torch.randn(b, c, h, w) * 3 + 1
        grad = torch.randn(b, c, h + 2, w + 2)
        flat = x.reshape(1, b * c, h, w)
        saved = (padding.FOLD_MIN_NUMEL, instnorm.FAST_MIN_NUMEL)
        padding.FOLD_MIN_NUMEL = instnorm.FAST_MIN_NUMEL = 0  # time the replacements at every size
        try:
            torch.testing.assert_close(
                padding.reflect_pad_backward(grad, 1), aten.reflection_pad2d_backward(grad, x, [1] * 4)
            )
            ms = median_ms(
                {
                    "pad torch": lambda: aten.reflection_pad2d_backward(grad, x, [1] * 4),  # noqa: B023
                    "pad fold": lambda: padding.reflect_pad_backward(grad, 1),  # noqa: B023
                    "in torch": lambda: aten.native_batch_norm(flat, None, None, None, None, True, 0.0, 1e-5),  # noqa: B023
                    "in ours": lambda: instnorm.norm_stats(x, 1e-5),  # noqa: B023
                },
                args.repeat,
            )
        finally:
            padding.FOLD_MIN_NUMEL, instnorm.FAST_MIN_NUMEL = saved
        mib = x.numel() * 4 / 2**20
        print(f"| {(b, c, h, w)} | {mib:.2f} | {ms['pad torch']:.3f} | {ms['pad fold']:.3f} "
              f"| {ms['pad torch'] / ms['pad fold']:.2f} | {ms['in torch']:.3f} | {ms['in ours']:.3f} "
              f"| {ms['in torch'] / ms['in ours']:.2f} |", flush=True)  # fmt: skip
    conv_table(args.repeat)
    norm_table(args.repeat)


NORM_SHAPES = [(1, 8, 256, 256), (1, 8, 128, 128), (1, 8, 64, 64), (1, 16, 128, 128), (1, 32, 128, 128)]
VAR_SHAPES = [(2, 128, 32, 32), (2, 64, 64, 64), (2, 32, 128, 128), (2, 128, 64, 64)]


def norm_table(repeat: int) -> None:
    """Channels_last instance-norm backward and spatial var_mean (forward and backward): torch's
    kernels against the plugin's plain ops."""
    print("\n| op | input shape | layout | torch | ours | torch / ours |")
    print("|---|---|---|---:|---:|---:|")
    cl = torch.channels_last
    for shape in NORM_SHAPES:
        x = (torch.randn(shape) * 3 + 1).contiguous(memory_format=cl)
        g = torch.randn_like(x)
        _, mean, invstd = instnorm.norm_stats(x, 1e-5)

        def backward(
            plain: bool, x: Tensor = x, g: Tensor = g, m: Tensor = mean, s: Tensor = invstd
        ) -> Tensor:
            if plain:
                return instnorm.plain_norm_backward(g, x, m, s)
            saved = instnorm.plain_backward
            instnorm.plain_backward = False  # torch's per-sample kernel
            try:
                return instnorm.norm_backward(g, x, m, s, 1e-5)
            finally:
                instnorm.plain_backward = saved

        torch.testing.assert_close(backward(True), backward(False), rtol=1e-4, atol=1e-4)
        ms = median_ms({"torch": lambda: backward(False), "ours": lambda: backward(True)}, repeat)
        print(f"| IN backward | {shape} | channels_last | {ms['torch']:.3f} | {ms['ours']:.3f} "
              f"| {ms['torch'] / ms['ours']:.2f} |", flush=True)  # fmt: skip
    for shape in VAR_SHAPES:
        for layout in (torch.contiguous_format, cl):
            x = torch.randn(shape).contiguous(memory_format=layout).requires_grad_()
            grads = (torch.randn(shape[0], shape[1], 1, 1), torch.randn(shape[0], shape[1], 1, 1))
            torch_vm = lambda x=x: torch.var_mean(x, dim=(2, 3), keepdim=True)  # noqa: E731
            for a, b in zip(torch_vm(), instnorm.var_mean_hw(x), strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
            calls = {
                "torch": lambda f=torch_vm, g=grads: torch.autograd.backward(f(), g),
                "ours": lambda x=x, g=grads: torch.autograd.backward(instnorm.var_mean_hw(x), g),
            }
            ms = median_ms(calls, repeat)
            name = "channels_last" if layout == cl else "default"
            print(f"| var_mean fwd+bwd | {shape} | {name} | {ms['torch']:.3f} | {ms['ours']:.3f} "
                  f"| {ms['torch'] / ms['ours']:.2f} |", flush=True)  # fmt: skip


def conv_table(repeat: int) -> None:
    """oneDNN in both layouts against the im2col kernel for 3x3 convolutions, forward and both gradients."""
    print("\n| batch, in -> out channels, size, groups | oneDNN fwd+bwd | im2col fwd+bwd | im2col / oneDNN "
          "| oneDNN channels_last fwd+bwd | channels_last / oneDNN |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for b, cin, cout, hw, groups in CONVS:
        ms = conv_ms(b, cin, cout, hw, groups, repeat)
        im2col = f"{ms['im2col']:.2f} | {ms['im2col'] / ms['onednn']:.2f}" if "im2col" in ms else "- | -"
        print(f"| {b}, {cin} -> {cout}, {hw}², {groups} | {ms['onednn']:.2f} | {im2col} "
              f"| {ms['channels_last']:.2f} | {ms['channels_last'] / ms['onednn']:.2f} |", flush=True)  # fmt: skip


def conv_ms(b: int, cin: int, cout: int, hw: int, groups: int, repeat: int) -> dict[str, float]:
    """Milliseconds of one convolution's forward and backward per kernel and layout (im2col: ungrouped only)."""
    x = torch.randn(b, cin * groups, hw + 2, hw + 2)
    w = torch.randn(cout * groups, cin, 3, 3)
    g = torch.randn(b, cout * groups, hw, hw)
    cl = torch.channels_last
    kernels: dict[str, tuple[Callable[[Tensor, Tensor], Tensor], torch.memory_format]] = {
        "onednn": (lambda a, v: F.conv2d(a, v, groups=groups), torch.contiguous_format),
        "channels_last": (lambda a, v: F.conv2d(a, v, groups=groups), cl),
    }
    if groups == 1:
        kernels["im2col"] = (
            lambda a, v: torch._C._nn.thnn_conv2d(a, v, [3, 3], None, [1, 1], [0, 0]),
            torch.contiguous_format,
        )
    calls = {}
    for name, (conv, layout) in kernels.items():
        a, v = (t.contiguous(memory_format=layout).requires_grad_() for t in (x, w))
        torch.testing.assert_close(conv(a, v), F.conv2d(x, w, groups=groups), rtol=1e-4, atol=1e-3, msg=name)
        d = g.contiguous(memory_format=layout)
        calls[name] = lambda conv=conv, a=a, v=v, d=d: torch.autograd.grad(conv(a, v), (a, v), d)
    return median_ms(calls, repeat)


if __name__ == "__main__":
    main()
