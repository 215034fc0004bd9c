"""Running independent pieces of a step at once (inter-op parallelism on CPU).

On a CPU with few cores, torch's intra-op threads scale poorly on the mid-sized operators of a
small network: two independent computations, each on its own thread with one intra-op thread,
finish sooner than the same two one after the other on all threads. :func:`run_concurrently`
runs callables that way. Each worker thread gets the caller's grad mode, its autocast state (per
device type, with its dtype) and a copy of its ``contextvars``. Saved-tensor hooks are thread-local
in torch and are *not* carried over.

Gradients of disjoint parameter sets may be accumulated from two threads at once (torch's
autograd engine supports concurrent ``backward`` calls from different threads); the callables
must not share parameters that both accumulate into.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Literal, TypeVar

import torch

from .errors import UserError

T = TypeVar("T")

#: name prefix of the worker threads (profilers and debuggers that record one thread can check for them)
WORKER_PREFIX = "branchadapt-concurrent"

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
_WORKER = threading.local()

#: device types whose autocast state a worker thread inherits
_AUTOCAST_DEVICES = ("cpu", "cuda")


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix=WORKER_PREFIX)
            atexit.register(_POOL.shutdown, wait=False)
        return _POOL


def concurrency_applies(
    setting: bool | Literal["auto"],
    device: torch.device,
    *,
    distributed: bool = False,
    compiled: bool = False,
    name: str = "concurrent",
) -> bool:
    """Whether to run independent work concurrently: ``True``/``False`` as given, ``"auto"`` on a CPU
    device with at least two intra-op threads, outside a distributed run (whose gradient hooks
    expect one backward per forward) and without compiled modules (their graphs are specialised
    to the thread count, so worker threads would recompile them). ``True`` in a distributed run is
    a user error naming the setting (``name``): DDP cannot reduce a split backward pass."""
    if setting is True and distributed:
        raise UserError(
            f"{name} = true cannot run under torchrun: DistributedDataParallel expects one backward "
            f'pass per forward, and a concurrent step splits it; set {name} = "auto" (serial in a '
            "distributed run) or false"
        )
    if setting != "auto":
        return bool(setting)
    return (
        device.type == "cpu"
        and torch.get_num_threads() >= 2
        and not distributed
        and not compiled
        and not in_worker()
    )


def in_worker() -> bool:
    """True inside a callable run by :func:`run_concurrently` (no nesting: it runs serially there)."""
    return bool(getattr(_WORKER, "active", False))


def _autocast_state() -> list[tuple[str, torch.dtype]]:
    """The device types autocast is on for in this thread, with their dtypes."""
    return [(d, torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES if torch.is_autocast_enabled(d)]


def run_concurrently(calls: Sequence[Callable[[], T]]) -> list[T]:
    """Results of ``calls``, run at once on worker threads, each with an equal share of the caller's
    intra-op threads (at least one); serially when there are fewer than two calls, fewer than two
    threads, or when already inside a worker. The first exception raised is re-raised here after
    every call has finished."""
    threads = torch.get_num_threads()
    if len(calls) < 2 or threads < 2 or in_worker():
        return [call() for call in calls]
    if len(calls) > 2:
        raise ValueError(f"run_concurrently takes at most 2 calls, got {len(calls)}")
    share = max(1, threads // len(calls))
    grad = torch.is_grad_enabled()
    autocasts = _autocast_state()

    def worker(call: Callable[[], T], context: contextvars.Context) -> T:
        torch.set_num_threads(share)  # this thread's OpenMP team (and, process-wide, MKL's)
        _WORKER.active = True
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(torch.set_grad_enabled(grad))
                for device_type, dtype in autocasts:
                    stack.enter_context(torch.autocast(device_type, dtype=dtype))
                return context.run(call)
        finally:
            _WORKER.active = False

    pool = _pool()
    try:
        futures = [pool.submit(worker, call, contextvars.copy_context()) for call in calls]
        wait(futures)  # every call ends before an error surfaces
        return [future.result() for future in futures]
    finally:
        torch.set_num_threads(threads)  # the workers changed the process-wide count
