"""Running two independent pieces of a step at once, and the task hook that splits a backward pass."""

from __future__ import annotations

import contextvars
import threading

import pytest
import torch

import branchadapt as ba
from branchadapt import concurrency
from branchadapt.concurrency import concurrency_applies, run_concurrently
from branchadapt.trainer import Trainer

LABEL: contextvars.ContextVar[str] = contextvars.ContextVar("LABEL", default="unset")


@pytest.fixture
def two_threads():
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


def _probe(tag: str) -> dict[str, object]:
    return {
        "tag": tag,
        "thread": threading.current_thread().name,
        "threads": torch.get_num_threads(),
        "grad": torch.is_grad_enabled(),
        "label": LABEL.get(),
        "worker": concurrency.in_worker(),
    }


def test_calls_run_on_worker_threads_with_the_callers_state(two_threads):
    LABEL.set("caller")
    with torch.no_grad():
        a, b = run_concurrently([lambda: _probe("a"), lambda: _probe("b")])
    assert [a["tag"], b["tag"]] == ["a", "b"]  # results in the order of the calls
    for r in (a, b):
        assert str(r["thread"]).startswith("branchadapt-concurrent")
        assert r["threads"] == 1  # an equal share of the caller's 2 intra-op threads
        assert r["grad"] is False and r["label"] == "caller" and r["worker"] is True
    assert torch.get_num_threads() == 2  # restored for the caller
    assert not concurrency.in_worker()


def test_serial_with_one_thread_one_call_or_inside_a_worker():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        here = threading.current_thread().name
        results = run_concurrently([lambda: _probe("a"), lambda: _probe("b")])
        assert [r["thread"] for r in results] == [here, here]
    finally:
        torch.set_num_threads(saved)
    assert run_concurrently([lambda: _probe("only")])[0]["thread"] == threading.current_thread().name


def test_no_nesting(two_threads):
    def outer() -> list[str]:
        inner = run_concurrently([lambda: threading.current_thread().name] * 2)
        return [*inner, threading.current_thread().name]

    for names in run_concurrently([outer, outer]):
        assert len(set(names)) == 1  # the inner calls ran serially on the outer worker


def test_the_first_error_is_raised_after_both_calls_ended(two_threads):
    finished = threading.Event()

    def fails() -> None:
        raise KeyError("boom")

    def slow() -> None:
        torch.mm(torch.ones(300, 300), torch.ones(300, 300))
        finished.set()

    with pytest.raises(KeyError, match="boom"):
        run_concurrently([fails, slow])
    assert finished.is_set()
    assert torch.get_num_threads() == 2
    with pytest.raises(ValueError, match="at most 2 calls"):
        run_concurrently([lambda: 1] * 3)


def test_concurrent_backward_passes_accumulate_like_one(two_threads):
    torch.manual_seed(0)
    w1, w2 = torch.randn(8, 8, requires_grad=True), torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 8)
    ((x @ w1).tanh().sum() + (x @ w2).sin().sum()).backward()
    expected = w1.grad.clone(), w2.grad.clone()
    w1.grad = w2.grad = None
    run_concurrently([lambda: (x @ w1).tanh().sum().backward(), lambda: (x @ w2).sin().sum().backward()])
    torch.testing.assert_close((w1.grad, w2.grad), expected)


@pytest.mark.parametrize(
    ("setting", "where", "distributed", "expected"),
    [
        (True, "meta", False, True),
        (False, "cpu", False, False),
        (False, "cpu", True, False),
        ("auto", "cpu", False, True),
        ("auto", "cpu", True, False),
        ("auto", "cuda", False, False),
    ],
)
def test_when_concurrency_applies(two_threads, setting, where, distributed, expected):
    assert concurrency_applies(setting, torch.device(where), distributed=distributed) is expected


def test_true_under_torchrun_is_refused_naming_the_setting():
    with pytest.raises(ba.UserError, match=r'task\.concurrent = true cannot run under torchrun: .* set '
                       r'task\.concurrent = "auto" \(serial in a distributed run\) or false'):  # fmt: skip
        concurrency_applies(True, torch.device("cpu"), distributed=True, name="task.concurrent")


def test_auto_is_off_with_compiled_modules(two_threads):
    from torch import nn

    from branchadapt.compiling import has_compiled

    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    assert not has_compiled(net)
    net[0].compile()  # in place, lazily: nothing is compiled before a call
    assert has_compiled(net)
    assert not concurrency_applies("auto", torch.device("cpu"), compiled=True)
    assert concurrency_applies(True, torch.device("cpu"), compiled=True)


def test_auto_is_off_with_one_thread_and_on_under_autocast(two_threads):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert concurrency_applies("auto", torch.device("cpu"))  # the workers inherit autocast
    torch.set_num_threads(1)
    assert not concurrency_applies("auto", torch.device("cpu"))


def test_workers_inherit_the_callers_autocast_state(two_threads):
    """A matmul on a worker runs in the caller's autocast dtype, and a worker under no autocast
    stays in fp32 even after a bf16 call ran on the same pool thread."""
    a = torch.randn(8, 8)

    def probe() -> tuple[bool, torch.dtype, str]:
        return torch.is_autocast_enabled("cpu"), (a @ a).dtype, threading.current_thread().name

    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = run_concurrently([probe, probe])
    outside = run_concurrently([probe, probe])
    assert [r[:2] for r in inside] == [(True, torch.bfloat16)] * 2
    assert all(str(r[2]).startswith("branchadapt-concurrent") for r in inside)
    assert [r[:2] for r in outside] == [(False, torch.float32)] * 2


def test_the_trainer_back_propagates_through_the_task(monkeypatch, small_experiment, tmp_path):
    exp = ba.load_experiment(small_experiment())
    trainer = Trainer(exp, run_dir=tmp_path / "run", device="cpu")
    rt = trainer.build_stage(0, exp.stages[0], trainer.build_source())
    calls: list[tuple[str, bool]] = []
    default = type(rt.task).backward

    def spy(self, phase, loss, scratch):  # type: ignore[no-untyped-def]
        calls.append((phase, isinstance(scratch, dict)))
        default(self, phase, loss, scratch)

    monkeypatch.setattr(type(rt.task), "backward", spy)
    trainer.train_step(rt, rt.data[0])
    assert calls == [(p.name, True) for p in rt.phases if rt.losses.get(p.name)]
    assert any(p.grad is not None for m in rt.modules.values() for p in m.parameters())
