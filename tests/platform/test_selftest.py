"""`ioulab selftest`: passes on this CPU, and its checks fail when what they check is broken."""
from __future__ import annotations

import pytest
import torch

from ioulab.platform.cli import main
from ioulab.platform.commands import selftest


@pytest.mark.slow
def test_selftest_cpu_passes(capsys):
    assert main(["selftest", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    names = [line.split()[1] for line in out.splitlines() if line.strip().startswith(("PASS", "FAIL"))]
    assert all(line.strip().startswith("PASS") for line in out.splitlines() if line.strip()[:4] in ("PASS", "FAIL"))
    assert {"prroi/float32", "prroi/float16", "prroi/bfloat16", "train/amp-bfloat16/smooth_l1",
            "train/amp-bfloat16/bce", "eval/baseline", "eval/iou_nms", "eval/iou_regular_nms",
            "eval/refine", "timer/sync"} <= set(names)
    assert out.strip().splitlines()[-1].startswith(f"{len(names)} passed, 0 failed")


def test_prroi_check_catches_a_wrong_kernel(monkeypatch):
    """A kernel that is off by 1% of the output scale fails the float32 comparison."""
    from ioulab.detector import ops

    real = ops.prroi_pool

    def skewed(input, rois, output_size, spatial_scale=1.0, backend=None):
        out = real(input, rois, output_size, spatial_scale, backend=backend)
        return out * 1.01 if backend == "extension" else out

    monkeypatch.setattr(ops, "prroi_pool", skewed)
    passed, detail = selftest.check_prroi(torch.device("cpu"), torch.float32)
    assert not passed and "out" in detail
    monkeypatch.setattr(ops, "prroi_pool", real)
    passed, detail = selftest.check_prroi(torch.device("cpu"), torch.float32)
    assert passed, detail


def test_timer_check_fails_without_synchronisation(monkeypatch):
    """Told the device is CUDA, a timer that never synchronises fails the check (no GPU needed:
    the check records the synchronisation calls instead of making them)."""
    import contextlib
    import time

    from ioulab.platform.bench import timing

    @contextlib.contextmanager
    def unsynced(device):
        watch = timing.Stopwatch()
        start = time.perf_counter()
        yield watch
        watch.seconds = time.perf_counter() - start

    passed, detail = selftest.check_timer_sync(torch.device("cpu"))
    assert passed, detail
    monkeypatch.setattr(timing, "timed", unsynced)
    passed, detail = selftest.check_timer_sync(torch.device("cuda"))
    assert not passed and "does not synchronise cuda" in detail, detail


def test_cuda_without_gpu_is_one_line_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["selftest", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ioulab: error: --device cuda: torch") and "\n" not in err


def test_eval_check_bounds_the_aps_not_the_forward_time(monkeypatch):
    """The eval check wants every AP in [0, 100]; the forward time (ms per image) may be larger."""
    from ioulab.detector.engine import evaluate

    metrics = {"AP": 40.0, "AP50": 60.0, "AP90": 5.0, "time/infer_ms_per_image": 250.0}
    monkeypatch.setattr(evaluate, "evaluate_checkpoint", lambda *a, **k: (dict(metrics), None))
    assert selftest.check_inference_mode("cpu", "ckpt.pth", "baseline") == (True, "AP 40.0  AP50 60.0  AP90 5.0")
    metrics["AP90"] = 101.0
    passed, detail = selftest.check_inference_mode("cpu", "ckpt.pth", "baseline")
    assert not passed and "AP90" in detail and "time/" not in detail
