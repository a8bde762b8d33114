"""The one timer of every `ioulab bench …`: right on a GPU.

CUDA kernels run asynchronously: ``time.perf_counter()`` around ``model(x)`` measures the launch,
not the work. :func:`timed` therefore waits for the device (``torch.cuda.synchronize``) before it
starts the clock and again before it stops it; on a CPU the waits are no-ops. It lives in
:mod:`ioulab.detector.engine.timing` (every evaluation times its forwards with it) and is
re-exported here.

- ``with timed(device) as t: ...`` then ``t.seconds``: one region.
- ``time_call(fn, repeats, warmup, device)``: the median of ``repeats`` timed calls.
- ``timer_synchronises(device)``: True if :func:`timed` does what ``device`` needs: synchronise a
  CUDA device before the start and before the stop of a region, nothing on a CPU (checked with a
  recorder in place of ``torch.cuda.synchronize``, so it runs without a GPU); ``ioulab selftest``
  reports it.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable
from unittest import mock

import torch

from ioulab.detector.engine.timing import DeviceLike, Stopwatch, synchronize, timed  # noqa: F401  (re-exported)


def time_call(fn: Callable[[], Any], repeats: int, warmup: int = 1, device: DeviceLike = "cpu") -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls, each call timed
    with :func:`timed` on ``device``."""
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        with timed(device) as t:
            fn()
        seconds.append(t.seconds)
    return statistics.median(seconds)


def timer_synchronises(device: DeviceLike = "cuda") -> bool:
    """Whether :func:`timed` synchronises ``device`` before starting and before stopping its clock
    (for CUDA; for a CPU: that it calls no synchronisation at all).

    ``torch.cuda.synchronize`` is replaced by a recorder for the check (no GPU needed, none used);
    the clock reads are recorded too, so the order is checked, not just the calls."""
    device = torch.device(device)
    events: list[Any] = []
    clock = time.perf_counter

    def record_sync(dev=None):
        events.append(("sync", torch.device(dev) if dev is not None else None))

    def record_clock():
        events.append("clock")
        return clock()

    with mock.patch.object(torch.cuda, "synchronize", record_sync), \
            mock.patch.object(time, "perf_counter", record_clock):
        with timed(device):
            events.append("body")
    sync = ("sync", device)
    if device.type != "cuda":
        return events == ["clock", "body", "clock"]
    return events == [sync, "clock", "body", sync, "clock"]
