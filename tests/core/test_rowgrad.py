"""Live and detached rows in one call: shared gradients from the live rows, equal to separate calls."""

from __future__ import annotations

import copy
import threading
import time
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

import branchadapt as ba
from branchadapt import BranchedModel, Participation, rowgrad


class Mixer(nn.Module):
    """Convolution, linear, element-wise parameters and parameter-only arithmetic, rows independent."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, stride=2)
        self.gate = nn.Linear(4, 1)
        self.rho = nn.Parameter(torch.rand(1, 4, 1, 1))
        self.lin = nn.Linear(4, 5)
        self.w = nn.Parameter(torch.rand(1, 5))
        self.seq = nn.Conv1d(1, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.addcmul(1 - self.rho, self.conv(x), self.rho)
        y = y * self.gate.weight[:, :, None, None]  # a parameter view meets the batch
        v = self.lin(y.mean((2, 3)))
        v = v * (1 - self.w) + self.w * v.square()
        return self.seq(v[:, None]).flatten(1)


def _split_reference(net: nn.Module, x: torch.Tensor, live: int) -> torch.Tensor:
    detached = {n: p.detach() for n, p in net.named_parameters()}
    return torch.cat((net(x[:live]), functional_call(net, detached, (x[live:],))))


def _grads(out: torch.Tensor, weights: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad((out * weights).sum(), inputs, allow_unused=True, materialize_grads=True))


def test_one_call_equals_separate_calls_in_value_and_every_gradient():
    torch.manual_seed(0)
    net = Mixer().double()
    x = torch.randn(5, 3, 8, 8, dtype=torch.double, requires_grad=True)
    inputs = [x, *net.parameters()]
    ref = _split_reference(net, x, live=2)
    weights = torch.randn_like(ref)
    expected = _grads(ref, weights, inputs)
    with rowgrad.LiveRows(net.parameters(), rows=5, live=2):
        out = net(x)
    torch.testing.assert_close(out, ref)
    for got, want in zip(_grads(out, weights, inputs), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # the same call without the mode gives every parameter gradients from all rows: the check has teeth
    plain = _grads(net(x), weights, inputs)
    assert all(not torch.allclose(a, b) for a, b in zip(plain[1:], expected[1:], strict=True) if b.any())


def test_under_autocast_one_call_equals_separate_calls():
    """bf16 autocast runs the restricted linears and convolutions in bf16, as it runs torch's own;
    every gradient comes back in its tensor's dtype and equals separate calls under autocast."""
    torch.manual_seed(0)
    net = Mixer()
    x = torch.randn(5, 3, 8, 8, requires_grad=True)
    inputs = [x, *net.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _split_reference(net, x, live=2)
        with rowgrad.LiveRows(net.parameters(), rows=5, live=2):
            out = net(x)
    assert out.dtype == ref.dtype == torch.bfloat16  # the last layer ran in bf16 in both
    weights = torch.randn_like(ref, dtype=torch.float32)
    got, want = _grads(out.float(), weights, inputs), _grads(ref.float(), weights, inputs)
    for g, w, t in zip(got, want, inputs, strict=True):
        assert g.dtype == t.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=0.02, atol=0.02)


def test_live_rows_are_visible_only_inside_the_mode():
    net = nn.Linear(2, 2)
    assert rowgrad.live_rows() is None
    own = nn.Parameter(torch.ones(2))  # e.g. a group's branch copy: not a shared parameter
    with rowgrad.LiveRows(net.parameters(), rows=4, live=3):
        assert rowgrad.live_rows() == 3
        with rowgrad.cooperating(net.weight, None) as live:
            assert live == 3  # a shared weight: gradients from the live rows
        with rowgrad.cooperating(own) as live:
            assert live is None  # its own weight: gradients from every row it is given
        with rowgrad.cooperating() as live:
            assert live is None
    assert rowgrad.live_rows() is None
    with rowgrad.cooperating(net.weight) as live:
        assert live is None
    with pytest.raises(ValueError, match="between 1 and rows - 1"):
        rowgrad.LiveRows(net.parameters(), rows=4, live=4)


class _Opaque(torch.autograd.Function):
    """A custom function using a parameter without declaring cooperation."""

    @staticmethod
    def forward(ctx, x, w):
        return x * w

    @staticmethod
    def backward(ctx, g):
        return g, g.sum(0, keepdim=True)


class _Cooperating(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x)
        with rowgrad.cooperating(w) as ctx.live:
            return x * w

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        gw = (rowgrad.weight_rows(g, ctx.live) * rowgrad.weight_rows(x, ctx.live)).sum(0, keepdim=True)
        return g * 1.0, gw


@pytest.mark.parametrize(
    ("op", "message"),
    [
        (lambda x, w: x @ w.t(), "matmul|combines a shared parameter with the batch"),
        (
            lambda x, w: torch.cat((x, w.expand(x.shape[0], -1)), 1),
            "combines a shared parameter with the batch",
        ),
        (lambda x, w: _Opaque.apply(x, w), "does not declare branchadapt.rowgrad.cooperating"),
        (lambda x, w: x * w.expand(x.shape[0], -1), "not broadcast along the rows"),
    ],
)
def test_operations_it_cannot_restrict_are_refused_not_guessed(op, message):
    w = nn.Parameter(torch.ones(1, 3))
    x = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(rowgrad.NotFusable, match=message), rowgrad.LiveRows([w], rows=4, live=2):
        op(x, w)


def test_a_cooperating_custom_function_keeps_its_own_live_rows():
    w = nn.Parameter(torch.randn(1, 3))
    x = torch.randn(4, 3)
    with rowgrad.LiveRows([w], rows=4, live=1):
        out = _Cooperating.apply(x, w)
    out.sum().backward()
    torch.testing.assert_close(w.grad, x[:1])


def test_each_thread_sees_its_own_mode():
    """Both directions of a step run at once in two threads (``task.concurrent``), each in its own
    mode: a custom function must get its own thread's live rows, not the other thread's."""
    nets = [nn.Linear(2, 2), nn.Linear(2, 2)]
    entered, checked = threading.Event(), threading.Event()
    seen: dict[str, object] = {}

    def first() -> None:
        with rowgrad.LiveRows(nets[0].parameters(), rows=4, live=1):
            entered.set()
            checked.wait(10)  # the other thread has entered its mode meanwhile
            seen["live"] = rowgrad.live_rows()
            with rowgrad.cooperating(nets[0].weight) as live:
                seen["cooperating"] = live

    def second() -> None:
        entered.wait(10)
        with rowgrad.LiveRows(nets[1].parameters(), rows=4, live=3):
            checked.set()
            seen["second"] = rowgrad.live_rows()
            time.sleep(0.2)  # still inside while the first thread checks

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen == {"live": 1, "cooperating": 1, "second": 3}
    assert rowgrad.live_rows() is None  # and none of it leaked into this thread


class Independent(ba.Backbone):
    """low -> mid (parameters in a linear, a convolution and an element-wise scale) -> top."""

    rows_independent = True

    def __init__(self, matmul: bool = False) -> None:
        super().__init__()
        self.matmul = matmul
        self.low = nn.Conv2d(2, 4, 3, padding=1)
        self.mid = nn.Conv2d(4, 4, 3, padding=1)
        self.scale = nn.Parameter(torch.full((1, 4, 1, 1), 1.5))
        self.head = nn.Linear(4, 4)
        self.top = nn.Linear(4, 3)

    def stage_names(self) -> list[str]:
        return ["low", "mid", "scale", "head", "top"]

    def stage_paths(self, stage: str) -> list[str]:
        return [] if stage == "scale" else [stage]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.mid(self.low(x))) * self.scale
        v = h.mean((2, 3))
        v = v @ self.head.weight.t() if self.matmul else self.head(v)
        return self.top(v)


def _pair(backbone: ba.Backbone) -> tuple[BranchedModel, BranchedModel]:
    torch.manual_seed(0)
    groups = ["anchor", "b", "c"]
    policy = {"b": Participation.DETACHED, "c": Participation.DETACHED}
    split = BranchedModel(backbone, groups, ["low", "top"], policy)
    with torch.no_grad():
        for p in split.branch_parameters():
            p.mul_(1 + 0.2 * torch.randn_like(p))
    fused = copy.deepcopy(split)
    fused.fused = True
    return split, fused


def _step(model: BranchedModel, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    out = model(x, groups=ids)
    out.square().sum().backward()
    return out.detach()


@pytest.mark.parametrize("stacked", [False, True])
def test_branched_model_in_one_call_learns_what_separate_calls_learn(stacked):
    split, fused = _pair(Independent())
    fused.stacked = stacked

    def no_split_path(*args, **kwargs):
        raise AssertionError("the fused model ran the groups as separate calls")

    fused._run = no_split_path  # type: ignore[method-assign]
    x = torch.randn(6, 2, 6, 6)
    ids = torch.tensor([1, 0, 2, 2, 0, 1])  # live rows not first: the fused call reorders and restores
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out_fused = _step(fused, x, ids)
    out_split = _step(split, x, ids)
    torch.testing.assert_close(out_fused, out_split, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(split.named_parameters(), fused.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fused.shared_parameters())


def test_auto_fuses_small_cpu_batches_only(monkeypatch):
    import branchadapt.branched as branched_mod

    split, auto = _pair(Independent())
    auto.fused = "auto"
    calls = {"fused": 0, "separate": 0}
    run_fused, run = auto._run_fused, auto._run

    def counting(kind, fn):
        def wrapped(*a, **k):
            calls[kind] += 1
            return fn(*a, **k)

        return wrapped

    auto._run_fused = counting("fused", run_fused)  # type: ignore[method-assign]
    auto._run = counting("separate", run)  # type: ignore[method-assign]
    x, ids = torch.randn(6, 2, 6, 6), torch.tensor([1, 0, 2, 2, 0, 1])  # 1,728 bytes of input
    out_small = _step(auto, x, ids)
    assert calls == {"fused": 1, "separate": 0}
    monkeypatch.setattr(branched_mod, "FUSE_AUTO_MAX_BYTES", x.numel() * x.element_size() - 1)
    out_large = _step(auto, x, ids)
    assert calls == {"fused": 1, "separate": 2}  # live and detached rows as two calls
    torch.testing.assert_close(out_large, out_small)
    torch.testing.assert_close(out_large, _step(split, x, ids))
    auto.fused = True  # forced: fuses whatever the size
    _step(auto, x, ids)
    assert calls == {"fused": 2, "separate": 2}
    with pytest.raises(ValueError, match="fused must be True, False or 'auto'"):
        auto.fused = "yes"  # type: ignore[assignment]


def test_branched_model_falls_back_once_with_a_warning_and_the_same_gradients():
    split, fused = _pair(Independent(matmul=True))
    x, ids = torch.randn(4, 2, 6, 6), torch.tensor([0, 1, 2, 0])
    with pytest.warns(UserWarning, match="separate calls: .*combines a shared parameter with the batch"):
        out_fused = _step(fused, x, ids)
    assert fused._unfusable is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: later steps go straight to separate calls
        _step(fused, x, ids)
    out_split = _step(split, x, ids)
    torch.testing.assert_close(out_fused, out_split)
    for p, q in zip(split.parameters(), fused.parameters(), strict=True):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6)


SEEN: list[int | None] = []  # rowgrad.live_rows() as each branch copy of _GainTop saw it


class _GainTop(nn.Module):
    """A top stage scaled by a tensor it is given; records the live rows it runs under."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, v: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        SEEN.append(rowgrad.live_rows())
        return self.lin(v) * gain


class GainIntoTop(Independent):
    """The top branch stage gets a gain: computed from a shared parameter alone, or a constant."""

    def __init__(self, shared_gain: bool) -> None:
        super().__init__()
        self.shared_gain = shared_gain
        self.gain = nn.Parameter(torch.full((3,), 0.5))
        self.top = _GainTop()  # type: ignore[assignment]

    def stage_names(self) -> list[str]:
        return [*super().stage_names(), "gain"]

    def stage_paths(self, stage: str) -> list[str]:
        return [] if stage == "gain" else super().stage_paths(stage)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.head((torch.relu(self.mid(self.low(x))) * self.scale).mean((2, 3)))
        gain = self.gain * 2 if self.shared_gain else torch.full((3,), 1.5)
        return self.top(v, gain)


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("shared_gain", [False, True])
def test_branch_copies_run_outside_the_mode_unless_given_shared_tensors(shared_gain, stacked):
    """A group's own copy needs no live-row restriction, and skipping the mode's per-operation hook
    there is faster. A tensor computed from shared parameters alone keeps the mode on: in a copy
    (a sub-batch, or vmap's view of one) the mode cannot restrict that parameter's gradient and
    says so, and the groups run as separate calls, rather than it taking gradients from every row."""
    split, fused = _pair(GainIntoTop(shared_gain))
    fused.stacked = stacked
    x, ids = torch.randn(6, 2, 6, 6), torch.tensor([1, 0, 2, 2, 0, 1])
    SEEN.clear()
    if shared_gain:
        with pytest.warns(UserWarning, match="separate calls: mul"):
            out_fused = _step(fused, x, ids)
        assert fused._unfusable is not None
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out_fused = _step(fused, x, ids)
        assert SEEN and set(SEEN) == {None}  # the copies ran outside the mode
    torch.testing.assert_close(out_fused, _step(split, x, ids), rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(split.named_parameters(), fused.parameters(), strict=True):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_no_one_call_without_the_backbones_promise_or_with_buffers():
    class Undeclared(Independent):
        rows_independent = False

    class Buffered(Independent):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("seen", torch.zeros(1))

    for backbone, reason in ((Undeclared(), "does not declare rows_independent"), (Buffered(), "buffers")):
        model = BranchedModel(backbone, ["anchor", "b"], ["low"], {"b": Participation.DETACHED}, fused=True)
        assert model._unfusable is not None and reason in model._unfusable
        # asked for and impossible: one warning at the first batch that would have fused, not silence
        x, ids = torch.randn(4, 2, 5, 5), torch.tensor([0, 0, 1, 1])
        with pytest.warns(
            UserWarning, match=f"fused = True: live and detached groups run as separate calls: .*{reason}"
        ):
            model(x, groups=ids)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model(x, groups=ids)  # said once
            model.fused = "auto"
            model(x, groups=ids)  # "auto" promised nothing
