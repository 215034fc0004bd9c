"""Shared fixtures: small experiments written to a temp dir, and a fresh plugin set per test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from branchadapt.plugins import reset_default_plugins

ROOT = Path(__file__).resolve().parents[1]

SMALL = """
name = "small"
seed = 3
groups = ["a", "b", "c"]
[data]
type = "clusters"
features = 6
classes = 3
counts = {{ a = 64, b = 8, c = 8 }}
[task]
type = "supervised"
[model]
type = "mlp"
in_features = 6
hidden = [16, 16]
out_features = 3
[losses.cross_entropy]
weight = 1.0
[optim.default]
lr = 1e-2
weight_decay = 1e-4
betas = [0.5, 0.999]
[train]
log_every = 2
checkpoint_every = {ckpt}
keep_last = 2
progress = "plain"
[stages.basic]
steps = {steps}
groups = ["a"]
sampler = {{ type = "per_group", per_group = 4 }}
[stages.transfer]
steps = {steps}
init_from = "basic"
splitter = {{ type = "branches", low = 1, top = 1 }}
sampler = {{ type = "per_group", per_group = 2 }}
"""


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tests use tiny tensors: one intra-op thread is faster and immune to a busy machine."""
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_plugins():
    reset_default_plugins()
    yield
    reset_default_plugins()


@pytest.fixture
def small_experiment(tmp_path: Path):
    def write(steps: int = 6, ckpt: int = 2, extra: str = "", name: str = "exp.toml") -> Path:
        path = tmp_path / name
        path.write_text(SMALL.format(steps=steps, ckpt=ckpt) + extra)
        return path

    return write


@pytest.fixture
def run_cli():
    """Run the CLI in a subprocess, as a user would."""
    return _run_cli


def _run_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the installed CLI in a subprocess (what a user types), on one thread like the tests."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "branchadapt.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=900,
    )
