"""torch.distributed training: 2 gloo processes on CPU reach the weights of 1 process with the same
global batch and seed (selective back-propagation included), and a 2-process checkpoint resumes
under 1 process."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from branchadapt import UserError
from branchadapt.checkpoint import read_tensors
from branchadapt.distributed import from_env, shard, wrap_ddp

ROOT = Path(__file__).resolve().parents[2]

# quickstart, shrunk: a basic stage on the anchor, then branches with detached few-shot groups
TINY = """
extends = "{quickstart}"
name = "tiny-ddp"
[train]
log_every = 5
checkpoint_every = 10
progress = "none"
[stages.basic]
steps = 12
sampler = {{ type = "per_group", per_group = 8 }}
[stages.transfer]
steps = 20
sampler = {{ type = "per_group", per_group = 2 }}
"""


def test_shard_takes_every_nth_item_of_the_global_plan():
    plan = {"x": [("a", 0), ("a", 1), ("b", 5), ("b", 6)]}
    assert shard(plan, 0, 2) == {"x": [("a", 0), ("b", 5)]}  # every group on every rank
    assert shard(plan, 1, 2) == {"x": [("a", 1), ("b", 6)]}
    assert shard(plan, 0, 1) == plan
    with pytest.raises(UserError, match=r"stream 'x' at step 3 has 4 items, not a multiple of the 3"):
        shard(plan, 0, 3, step=3)


def test_environment_is_read_as_torchrun_sets_it():
    info = from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (info.rank, info.world, info.enabled, info.is_main) == (1, 2, True, False)
    assert not from_env({}).enabled
    with pytest.raises(UserError, match="must be integers"):
        from_env({"WORLD_SIZE": "two"})


class _Three(torch.nn.Module):
    """Parameters used by every rank, by rank 0 only, and by no rank."""

    def __init__(self) -> None:
        super().__init__()
        self.both, self.only0, self.none = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))

    def forward(self, rank: int) -> torch.Tensor:
        out = self.both.sum() * (rank + 1)  # gradients 1 and 2 -> 1.5
        if rank == 0:
            out = out + self.only0.sum() * 4  # 4 and (absent = 0) -> 2
        return out


def _average_worker(rank: int, store: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    module = _Three()
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with torch.no_grad():  # each rank starts from its own weights: rank 0's must win everywhere
        frozen.weight.fill_(rank + 1)
    wrapped = wrap_ddp({"m": module, "frozen": frozen}, torch.device("cpu"))
    assert isinstance(wrapped["m"], DistributedDataParallel)
    assert not isinstance(wrapped["frozen"], DistributedDataParallel)  # nothing to synchronise
    torch.save(frozen.weight.clone(), f"{out}.frozen.{rank}")
    for _ in range(2):  # a second step: the unused parameters must not stall the reducer
        module.zero_grad(set_to_none=True)
        wrapped["m"](rank).backward()
    torch.save(
        {"both": module.both.grad, "only0": module.only0.grad, "none": module.none.grad}, f"{out}.{rank}"
    )
    del wrapped  # DDP's reducer must go before its process group
    gc.collect()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_ddp_averages_zero_fills_missing_and_keeps_unused_none(tmp_path):
    out = str(tmp_path / "grads")
    mp.spawn(_average_worker, args=(str(tmp_path / "store"), out), nprocs=2)
    for rank in (0, 1):
        g = torch.load(f"{out}.{rank}")
        assert torch.equal(g["both"], torch.full((3,), 1.5))
        assert torch.equal(g["only0"], torch.full((3,), 2.0))
        assert g["none"] is None  # no rank had a gradient: the optimiser must skip it as on one process
        assert torch.equal(torch.load(f"{out}.frozen.{rank}"), torch.ones(2, 2))  # rank 0's, broadcast


def test_one_process_runs_unwrapped():
    modules = {"m": torch.nn.Linear(2, 2)}
    assert wrap_ddp(modules, torch.device("cpu"))["m"] is modules["m"]


def _run(
    tmp_path: Path, run_dir: Path, procs: int, *extra: str, evaluate: bool = False
) -> subprocess.CompletedProcess[str]:
    exp = tmp_path / "tiny.toml"
    exp.write_text(TINY.format(quickstart=(ROOT / "examples" / "quickstart.toml").as_posix()))
    cli = ["-m", "branchadapt", "run", str(exp), "--run-dir", str(run_dir), *extra]
    cli += [] if evaluate else ["--no-eval"]
    if procs > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={procs}",
            *cli,
        ]
    else:
        cmd = [sys.executable, *cli]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _final(run_dir: Path) -> dict[str, torch.Tensor]:
    return read_tensors(run_dir / "stages" / "transfer" / "final.safetensors")


def test_two_processes_match_one_and_resume_under_one(tmp_path):
    one, two, mixed = tmp_path / "one", tmp_path / "two", tmp_path / "mixed"
    _run(tmp_path, one, 1)
    log = _run(tmp_path, two, 2, evaluate=True)
    assert "processes: 2" in log.stderr
    # rank 0 evaluates alone after training (the process group is gone by then)
    assert log.stderr.count("metrics written to") == 1
    assert (two / "eval" / "transfer-test" / "metrics.json").is_file()
    a, b = _final(one), _final(two)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    # the shared stages did move in the transfer stage (anchor gradients), so the match is not trivial
    basic = read_tensors(one / "stages" / "basic" / "final.safetensors")
    shared = [k for k in basic if k in a and ".branches." not in k]
    assert shared and any(not torch.equal(basic[k], a[k]) for k in shared)
    # rank 0 alone wrote the metrics: one line per logged step, not one per process
    logged = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    alone = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in logged] == [(r["stage"], r["step"]) for r in alone]
    # ...and the logged losses are the global batch's: the mean over ranks, as one process computes them
    for mine, theirs in zip(logged, alone, strict=True):
        losses = [k for k in theirs if k.startswith(("loss/", "total/"))]
        assert losses and [k for k in mine if k.startswith(("loss/", "total/"))] == losses
        for key in losses:
            assert mine[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), (mine["step"], key)

    # a changed experiment in that directory: every rank refuses it, rank 0 alone says so, no rank
    # is left waiting for rank 0 (before, rank 1 died in a barrier with a gloo traceback)
    with pytest.raises(AssertionError) as refused:
        _run(tmp_path, two, 2, "--set", "optim.default.lr=0.5")
    assert str(refused.value).count("holds a run of a different experiment") == 1
    assert "[rank1]" not in str(refused.value) and "exitcode: 2" in str(refused.value).replace("  ", " ")

    _run(tmp_path, mixed, 2, "--max-steps", "22")  # pauses in the transfer stage (checkpoint at step 10)
    assert (mixed / "checkpoints").is_dir() and not (mixed / "stages" / "transfer").exists()
    _run(tmp_path, mixed, 1)  # resumes under one process
    c = _final(mixed)
    for key in a:
        torch.testing.assert_close(c[key], a[key], rtol=1e-4, atol=1e-5, msg=key)


RANK_FAIL = """
import os
import branchadapt as ba
from branchadapt.builtin.example import ClusterData


class RankFail(ClusterData):
    calls = 0

    def get(self, group, stream, index, rng):
        RankFail.calls += 1
        if os.environ.get("RANK") == "1" and RankFail.calls > 40:
            raise ba.UserError(f"items/{group}/{index}: cannot read (rank 1 only)")
        return super().get(group, stream, index, rng)


@ba.hookimpl
def register_data(register):
    register(RankFail, name="rank_fail")
"""


def test_a_rank_that_fails_alone_ends_the_job_instead_of_hanging(tmp_path):
    (tmp_path / "rankfail.py").write_text(RANK_FAIL)
    exp = tmp_path / "fail.toml"
    exp.write_text(
        f'extends = "{(ROOT / "examples" / "quickstart.toml").as_posix()}"\nplugins = ["rankfail"]\n'
        '[data]\ntype = "rank_fail"\n[train]\ncheckpoint_every = 2\nprogress = "plain"\n'
        "[stages.basic]\nsteps = 30\nsampler = { type = 'per_group', per_group = 8 }\n"
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += ["-m", "branchadapt", "run", str(exp), "--run-dir", str(tmp_path / "run"), "--no-eval"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # before the fix, the failing rank waited for the others in a barrier and the job never ended
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0
    assert "error: items/anchor/" in proc.stderr and "cannot read (rank 1 only)" in proc.stderr
    assert "stage basic: stopped before step" in proc.stderr
    assert "exitcode: 2" in proc.stderr or "exitcode  : 2" in proc.stderr  # the rank's own user-error exit


def test_a_bad_experiment_file_under_torchrun_is_reported_by_rank_0_only(
    small_experiment, monkeypatch, capsys
):
    from branchadapt.cli import main

    path = str(small_experiment())
    for rank, says in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert main(["run", path, "--set", "model.hiden=3"]) == 2  # every rank stops, with exit 2
        err = capsys.readouterr().err
        assert ("model.hiden: unknown key" in err) is says, (rank, err)
