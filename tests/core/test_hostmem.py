"""Keeping freed host memory for reuse: what it changes, when it applies, who applies it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import branchadapt as ba
from branchadapt import device, hostmem
from branchadapt.trainer import Trainer

glibc = pytest.mark.skipif(hostmem._glibc() is None, reason="needs glibc")

# A child process allocates, touches and frees a 64 MiB and a 4 MiB tensor ten times and prints the
# page faults of the last five rounds. glibc's default maps the large one afresh every round
# (16,384 faults each); with freed memory retained the heap reaches a steady state within the first
# rounds (an aligned request may not fit the block freed just before: the heap grows once more,
# usually in the second or third round, rarely later).
CHILD = """
import resource, sys, torch
from branchadapt import hostmem
if sys.argv[1] == "retain":
    assert hostmem.retain_freed_memory()
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t, u = torch.ones(1 << 24), torch.ones(1 << 20)
    del t, u
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[5:]))
"""


def _late_faults(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if k not in hostmem.ENVIRONMENT}
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


@glibc
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    assert _late_faults("default") > 5 * 8_000  # half the large tensor's pages each round, at least
    # Retained: the large tensor is not faulted in again round after round; one late growth of the
    # heap for either tensor (16,384 or 1,024 pages) was seen in about 1 of 10 runs: allowed
    assert _late_faults("retain") <= 16_384 + 1_024


# A child process retains freed memory, fills and frees 16 x 16 MiB in a worker thread (whose
# malloc arena keeps it), then prints its resident MiB before and after release_freed_memory().
RELEASE = """
import os, threading, torch
from branchadapt import hostmem
assert hostmem.retain_freed_memory()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
def work():  # blocks small enough for a thread arena's heaps (larger ones are mapped on their own)
    blocks = [torch.ones(1 << 22) for _ in range(16)]
    del blocks
thread = threading.Thread(target=work)
thread.start()
thread.join()
before = rss()
released = hostmem.release_freed_memory()
print(released, before, rss())
"""


@glibc
def test_release_returns_what_another_threads_arena_retained():
    env = {k: v for k, v in os.environ.items() if k not in hostmem.ENVIRONMENT}
    out = subprocess.run([sys.executable, "-c", RELEASE], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    released, before, after = out.stdout.split()
    assert released == "True"
    assert float(before) - float(after) > 200  # of the 256 MiB the worker thread left retained


@glibc
def test_the_environment_wins(monkeypatch):
    called = []
    monkeypatch.setattr(hostmem, "_glibc", lambda: called.append(1))
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert hostmem.retain_freed_memory() is False
    assert called == []  # mallopt was not even looked up
    with pytest.raises(ValueError, match="positive C int"):
        hostmem.retain_freed_memory(2**31)


@pytest.mark.parametrize(
    ("where", "retain", "expected"),
    [("cpu", True, 1), ("cpu", False, 0), ("cuda", True, 0), ("meta", True, 0)],
)
def test_configure_backend_applies_it_on_cpu_only_when_asked(monkeypatch, where, retain, expected):
    calls: list[int] = []
    monkeypatch.setattr(hostmem, "retain_freed_memory", lambda: calls.append(1) or True)
    saved = torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()
    try:
        device.configure_backend(torch.device(where), retain)
    finally:
        torch.backends.cudnn.benchmark = saved[0]
        torch.set_float32_matmul_precision(saved[1])
    assert len(calls) == expected


@pytest.mark.parametrize("value", [True, False])
def test_the_trainer_passes_the_option(monkeypatch, small_experiment, tmp_path, value):
    seen: list[bool] = []
    monkeypatch.setattr("branchadapt.trainer.configure_backend", lambda dev, retain: seen.append(retain))
    exp = ba.load_experiment(small_experiment(), [f"train.retain_freed_memory={str(value).lower()}"])
    Trainer(exp, run_dir=tmp_path / "run", device="cpu")
    assert seen == [value]
