"""Device-synchronised wall time: the timer of every evaluation and of every `ioulab bench …`.

CUDA kernels run asynchronously: ``time.perf_counter()`` around ``model(x)`` measures the launch,
not the work. :func:`timed` therefore waits for the device (``torch.cuda.synchronize``) before it
starts the clock and again before it stops it; on a CPU the waits are no-ops.

- ``with timed(device) as t: ...`` then ``t.seconds``: one region.
- :class:`ForwardTime`: the model forward's seconds over the images of an evaluation
  (``time/infer_ms_per_image``, see :func:`~ioulab.detector.engine.evaluate.predict`).

``platform/bench/timing.py`` re-exports the timer (the platform's benches use the same one).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

DeviceLike = torch.device | str

# The metric of an evaluation's forward time (platform/mlflow_names.py: INFER_MS_PER_IMAGE, same
# string; the detector does not import the platform).
INFER_MS_PER_IMAGE = "time/infer_ms_per_image"


def synchronize(device: DeviceLike) -> None:
    """Wait until the work queued on ``device`` is done (CUDA); nothing to wait for on a CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Stopwatch:
    seconds: float = float("nan")


@contextlib.contextmanager
def timed(device: DeviceLike) -> Iterator[Stopwatch]:
    """Wall time of the ``with`` body including the device work it queued (``.seconds`` on exit)."""
    watch = Stopwatch()
    synchronize(device)  # earlier work must not be counted
    start = time.perf_counter()
    yield watch
    synchronize(device)  # this region's work must be counted
    watch.seconds = time.perf_counter() - start


@dataclass
class ForwardTime:
    """Seconds the model's forward took over ``images`` images of an evaluation (the warm-up batch
    is not added: see :func:`~ioulab.detector.engine.evaluate.predict`)."""

    seconds: float = 0.0
    images: int = 0

    def add(self, seconds: float, images: int) -> None:
        self.seconds += seconds
        self.images += images

    @classmethod
    def total(cls, parts: Iterable["ForwardTime"]) -> "ForwardTime":
        """The sum of several (the ranks of a distributed evaluation)."""
        out = cls()
        for p in parts:
            out.add(p.seconds, p.images)
        return out

    def metrics(self) -> dict[str, float]:
        """``{time/infer_ms_per_image: ms}``; empty when no image was timed."""
        return {INFER_MS_PER_IMAGE: 1000.0 * self.seconds / self.images} if self.images else {}
