"""Peak memory of the paper's stages: is the transfer stage's extra memory the branches' state?

Each configuration runs in a fresh process (peak RSS, ``ru_maxrss``, after ``--steps`` training
steps); rows:

- ``basic``: stage 1, one photo + one cartoon, one shared model;
- ``transfer, no branches``: stage 2's batch (4 groups) with one shared model (``finetune``);
- ``transfer, branches``: the recipe with the defaults (low = top = 2, selective BP; branch
  copies stacked into one vmap call and live/detached rows fused only where ``"auto"`` picks it);
- ``transfer, branches as a loop``: the recipe with ``train.stack_branches = false`` (the copies
  one group after the other);
- ``transfer, branches as a loop, unfused units``: the loop with the generator's low-memory units
  (``branchadapt_cartoon.lowmem``) switched off: autograd then also keeps every ReLU output and
  padded map of the hourglass units and every padded map before a convolution;
- ``transfer, branches, fused rows``: the recipe with ``train.fuse_participation = true`` (the
  live and detached groups' rows through the shared stages in one call at every size);
- ``transfer, branches, serial directions``: the recipe with ``task.concurrent = false`` (the two
  directions one after the other; by default on CPU they run at once, and so do their backward
  passes' transient buffers).

Saved activations are counted by a ``saved_tensors_hooks`` pair over one more step, storages
once however many nodes save them: the most bytes alive at once (what adds to the peak: autograd
frees a node's saved tensors after its backward) and the sum of every distinct storage saved in
the step (an upper bound, which also counts what an earlier backward already freed). That step
runs with ``task.concurrent = false``: saved-tensor hooks are thread-local, and the two directions'
worker threads would escape them (both orders save the same tensors).

Theory for the branch rows: every extra copy of a branched stage holds its parameters, their
gradients and Adam's two moments, 4 x 4 bytes per parameter; selective BP's detached views
of the shared stages share storage with the parameters, so they add nothing.

    .venv/bin/python benchmarks/memory.py --size 128 --width 32 --steps 3
"""

from __future__ import annotations

import argparse
import json
import resource
import signal
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import NO_BRANCHES, build

import branchadapt as ba
from branchadapt import hostmem
from branchadapt.branched import BranchedModel
from branchadapt.trainer import StageRuntime, Trainer

LOOP = "transfer, branches as a loop"
UNFUSED = "transfer, branches as a loop, unfused units"
FUSED = "transfer, branches, fused rows"
SERIAL = "transfer, branches, serial directions"
CONFIGS = {
    "basic": (0, []),
    "transfer, no branches": (1, NO_BRANCHES),
    "transfer, branches": (1, []),
    LOOP: (1, ["train.stack_branches=false"]),
    UNFUSED: (1, ["train.stack_branches=false"]),
    FUSED: (1, ["train.fuse_participation=true"]),
    SERIAL: (1, ["task.concurrent=false"]),
}


class _SavedStorages:
    """Storages autograd keeps for backward during a step: every distinct one, and the most alive at once.

    Each saved tensor is packed into a :class:`_Held` whose deletion (autograd frees a node's saved
    tensors after its backward, or with the graph) releases its storage; storages are counted once
    however many nodes save them. ``total`` sums every distinct storage saved in the step, an upper
    bound that ignores what backward frees before the next forward saves more; ``peak`` is the most
    bytes alive at once, which is what adds to the peak memory.
    """

    def __init__(self) -> None:
        self.refs: dict[int, int] = {}  # live storages: how many saved tensors hold each
        self.seen: dict[int, int] = {}  # every storage saved: its bytes (a live one's address is its own)
        self.live = self.peak = 0

    def pack(self, t: torch.Tensor) -> _Held:
        storage = t.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if not self.refs.get(ptr):
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        self.refs[ptr] = self.refs.get(ptr, 0) + 1
        self.seen[ptr] = nbytes
        # detached: the same storage without the autograd history, which for a saved output would
        # hold the node that holds this object (a cycle through C++ that gc cannot break)
        return _Held(self, ptr, t.detach())

    def release(self, ptr: int) -> None:
        self.refs[ptr] -= 1
        if not self.refs[ptr]:
            del self.refs[ptr]
            self.live -= self.seen[ptr]

    @property
    def total(self) -> int:
        return sum(self.seen.values())


class _Held:
    """A saved tensor and the counter to tell when autograd lets go of it."""

    __slots__ = ("counter", "ptr", "tensor")

    def __init__(self, counter: _SavedStorages, ptr: int, tensor: torch.Tensor) -> None:
        self.counter, self.ptr, self.tensor = counter, ptr, tensor

    def __del__(self) -> None:
        self.counter.release(self.ptr)


def _saved_bytes(trainer: Trainer, rt: StageRuntime, batch: ba.Batch) -> tuple[int, int]:
    """Bytes of the tensors autograd saves for backward during one step: the most alive at once,
    and every distinct storage saved (see :class:`_SavedStorages`)."""
    counter = _SavedStorages()
    # saved-tensor hooks are thread-local: this step runs both directions on this thread
    options, rt.task.options = rt.task.options, rt.task.options.model_copy(update={"concurrent": False})
    try:
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda held: held.tensor):
            trainer.train_step(rt, batch)
    finally:
        rt.task.options = options
    return counter.peak, counter.total


def _state_bytes(rt: StageRuntime) -> int:
    """Weights, gradients and optimiser state: what lives across steps."""
    total = 0
    for module in rt.modules.values():
        for p in module.parameters():
            total += p.numel() * p.element_size() * (2 if p.grad is not None else 1)
    for opt in rt.optimizers.values():
        for state in opt.state.values():
            total += sum(
                v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor) and v.ndim
            )
    return total


def child(
    name: str, size: int, width: int, steps: int, min_mb: float | None, retain: bool = True
) -> dict[str, float]:
    stage, extra = CONFIGS[name]
    extra = [*extra, f"train.retain_freed_memory={str(retain).lower()}"]
    if min_mb is not None:
        extra = [*extra, f"model.low_memory_min_mb={min_mb}"]
    if name == UNFUSED:
        from branchadapt_cartoon.lowmem import NormReluConv, ReflectConv2d

        NormReluConv.fused = ReflectConv2d.fused = False
    trainer, rt = build(size, width, stage, extra)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    for i in range(steps):
        trainer.train_step(rt, rt.data[i])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    # the counting step runs serially in this thread, whose malloc arena cannot reuse what the
    # worker threads of the steps above retained: give that back first (256 px did not fit else)
    hostmem.release_freed_memory()
    saved, saved_total = _saved_bytes(trainer, rt, rt.data[steps])
    params = sum(p.numel() for m in rt.modules.values() for p in m.parameters())
    extra_params = 0  # parameters beyond one copy of every branched stage
    for module in rt.modules.values():
        if isinstance(module, BranchedModel):
            per_group = sum(p.numel() for p in module.branch_parameters(module.groups[0]))
            extra_params += per_group * (len(module.groups) - 1)
    return {"peak_mb": peak, "built_mb": before, "params": params, "extra_params": extra_params,
            "state_mb": _state_bytes(rt) / 2**20, "saved_mb": saved / 2**20,
            "saved_total_mb": saved_total / 2**20}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument(
        "--low-memory-min-mb",
        type=float,
        default=None,
        help="the generator's low_memory_min_mb (default: the recipe's); 0: every unit saves memory",
    )
    ap.add_argument(
        "--glibc-defaults",
        action="store_true",
        help="train.retain_freed_memory = false: glibc returns freed memory to the kernel as usual",
    )
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        result = child(
            args.child, args.size, args.width, args.steps, args.low_memory_min_mb, not args.glibc_defaults
        )
        print(json.dumps(result))
        return
    rows: dict[str, dict[str, float]] = {}
    failed: dict[str, str] = {}
    for name in CONFIGS:
        cmd = [sys.executable, __file__, "--child", name, *map(str, ["--size", args.size, "--width", args.width,
               "--steps", args.steps, "--threads", args.threads])]  # fmt: skip
        if args.low_memory_min_mb is not None:
            cmd += ["--low-memory-min-mb", str(args.low_memory_min_mb)]
        if args.glibc_defaults:
            cmd += ["--glibc-defaults"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode == -signal.SIGKILL:  # the kernel's out-of-memory killer
            failed[name] = "killed (out of memory)"
            continue
        if done.returncode:
            sys.exit(f"{name}: the child process failed:\n{done.stderr[-3000:]}")
        rows[name] = json.loads(done.stdout.strip().splitlines()[-1])
    threshold = "the recipe's" if args.low_memory_min_mb is None else f"{args.low_memory_min_mb:g} MiB"
    allocator = "glibc's defaults" if args.glibc_defaults else "freed memory retained (the default)"
    print(f"{args.size} px, width {args.width}, peak RSS after {args.steps} steps (fresh process each), "
          f"low_memory_min_mb: {threshold}, allocator: {allocator}\n")  # fmt: skip
    print(
        "| configuration | parameters | weights+grads+Adam (MB) | saved activations, most alive (MB) "
        "| saved activations, all distinct (MB) | RSS after build (MB) | peak RSS (MB) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in CONFIGS:
        if name in failed:
            print(f"| {name} | | | | | | {failed[name]} |")
            continue
        r = rows[name]
        print(
            f"| {name} | {r['params']:,} | {r['state_mb']:.1f} | {r['saved_mb']:.1f} | {r['saved_total_mb']:.1f} "
            f"| {r['built_mb']:.0f} | {r['peak_mb']:.0f} |"
        )
    if any(name in failed for name in CONFIGS if name not in (UNFUSED, LOOP, FUSED, SERIAL)):
        return
    branched, plain, basic = rows["transfer, branches"], rows["transfer, no branches"], rows["basic"]
    theory = branched["extra_params"] * 16 / 2**20
    saved_change = branched["saved_mb"] - plain["saved_mb"]
    why = (
        " (detached groups keep no inputs for the shared stages' weight gradients)"
        if saved_change < 0
        else ""
    )
    print(
        f"\nbranches vs no branches (same batch): {branched['extra_params']:,} extra parameters x 16 bytes "
        f"(weights, gradients, Adam's 2 moments) = {theory:.1f} MB in theory, "
        f"{branched['state_mb'] - plain['state_mb']:.1f} MB counted; saved activations "
        f"{saved_change:+.1f} MB{why}; predicted peak change "
        f"{branched['state_mb'] - plain['state_mb'] + branched['saved_mb'] - plain['saved_mb']:+.1f} MB, "
        f"measured {branched['peak_mb'] - plain['peak_mb']:+.1f} MB"
    )
    print(
        f"transfer (branches) vs basic: state {branched['state_mb'] - basic['state_mb']:+.1f} MB, saved "
        f"activations {branched['saved_mb'] - basic['saved_mb']:+.1f} MB (4x the batch), predicted "
        f"{branched['state_mb'] - basic['state_mb'] + branched['saved_mb'] - basic['saved_mb']:+.0f} MB, "
        f"measured peak {branched['peak_mb'] - basic['peak_mb']:+.0f} MB"
    )
    if FUSED in rows:
        fused = rows[FUSED]
        print(
            f"fused rows: saved activations {fused['saved_mb']:.0f} vs {branched['saved_mb']:.0f} MB with the "
            f"defaults ({fused['saved_mb'] / branched['saved_mb']:.2f}x), all distinct {fused['saved_total_mb']:.0f} "
            f"vs {branched['saved_total_mb']:.0f} MB, peak RSS {fused['peak_mb']:.0f} vs {branched['peak_mb']:.0f} MB "
            f"({fused['peak_mb'] / branched['peak_mb']:.2f}x)"
        )
    if SERIAL in rows:
        serial = rows[SERIAL]
        print(
            f"both directions at once (the default) vs serial directions: peak RSS {branched['peak_mb']:.0f} vs "
            f"{serial['peak_mb']:.0f} MB ({branched['peak_mb'] - serial['peak_mb']:+.0f} MB)"
        )
    if LOOP not in rows:
        print(f"branches as a loop: {failed[LOOP]}")
        return
    loop = rows[LOOP]
    print(
        f"stacked branches: saved activations {branched['saved_mb']:.0f} vs {loop['saved_mb']:.0f} MB "
        f"as a loop ({branched['saved_mb'] / loop['saved_mb']:.2f}x), peak RSS {branched['peak_mb']:.0f} vs "
        f"{loop['peak_mb']:.0f} MB ({branched['peak_mb'] / loop['peak_mb']:.2f}x)"
    )
    if UNFUSED in failed:
        print(
            f"low-memory units: peak RSS {loop['peak_mb']:.0f} MB; unfused, the step did not fit this machine"
        )
        return
    unfused = rows[UNFUSED]
    print(
        f"low-memory units (loop): saved activations {loop['saved_mb']:.0f} vs {unfused['saved_mb']:.0f} MB "
        f"unfused ({loop['saved_mb'] / unfused['saved_mb']:.2f}x), peak RSS {loop['peak_mb']:.0f} vs "
        f"{unfused['peak_mb']:.0f} MB ({loop['peak_mb'] / unfused['peak_mb']:.2f}x)"
    )


if __name__ == "__main__":
    main()
