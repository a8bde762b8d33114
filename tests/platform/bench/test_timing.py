"""Every bench times through one helper that synchronises a CUDA device around the timed region."""
import pathlib
import time

import pytest
import torch

from ioulab.detector.engine import timing as engine_timing
from ioulab.platform.bench import timing


@pytest.fixture
def recorder(monkeypatch):
    """``torch.cuda.synchronize`` replaced by a recorder (no GPU here), with the clock reads."""
    events = []
    clock = time.perf_counter
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append(("sync", device)))
    monkeypatch.setattr(time, "perf_counter", lambda: events.append("clock") or clock())
    return events


@pytest.mark.parametrize("device", [torch.device("cuda"), torch.device("cuda", 1), "cuda:0"])
def test_cuda_regions_are_synchronised_before_start_and_stop(recorder, device):
    with timing.timed(device) as t:
        recorder.append("work")
    sync = ("sync", torch.device(device))
    assert recorder == [sync, "clock", "work", sync, "clock"]
    assert t.seconds >= 0


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_cpu_regions_are_not_synchronised(recorder, device):
    with timing.timed(device):
        recorder.append("work")
    assert recorder == ["clock", "work", "clock"]


def test_time_call_synchronises_every_timed_call(recorder):
    calls = []
    timing.time_call(lambda: calls.append(1), repeats=3, warmup=2, device="cuda")
    assert len(calls) == 5 and recorder.count(("sync", torch.device("cuda"))) == 6  # 2 per timed call


def test_time_call_is_the_median():
    durations = iter([0.03, 0.01, 0.02])
    assert timing.time_call(lambda: time.sleep(next(durations)), repeats=3, warmup=0) == pytest.approx(0.02, abs=0.008)


def test_timer_synchronises_is_true_for_the_real_helper_and_false_for_a_broken_one(monkeypatch):
    original = torch.cuda.synchronize, time.perf_counter
    assert timing.timer_synchronises("cuda") and timing.timer_synchronises("cpu")
    assert (torch.cuda.synchronize, time.perf_counter) == original  # the recorders are removed
    # the timer lives in detector/engine/timing.py (evaluations time their forwards with it too)
    assert timing.timed is engine_timing.timed and timing.synchronize is engine_timing.synchronize
    monkeypatch.setattr(engine_timing, "synchronize", lambda device: None)  # a timer that forgets the GPU
    assert not timing.timer_synchronises("cuda")


def test_benches_time_only_through_the_helper():
    bench_dir = pathlib.Path(timing.__file__).parent
    for path in bench_dir.glob("*.py"):
        if path.name in ("timing.py", "sweep.py"):  # sweep.py: the wall time of a whole sweep, no device work
            continue
        text = path.read_text()
        assert "perf_counter" not in text and "time.time(" not in text, path.name
