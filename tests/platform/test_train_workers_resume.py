"""A SIGKILLed `ioulab train --workers 2`, then `--resume`: the final weights equal an uninterrupted
2-worker run's bit for bit (every rank's RNG state is in the checkpoint), `log.jsonl` holds every
iteration once, and the killed run leaves no worker process behind."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from ioulab.detector.engine import checkpoint_file as ckpt_io
from tests.conftest import TINY_OVERRIDES
from tests.platform.test_train_interrupt import _logged

ITERS, PERIOD = 12, 4


def _args(synth_root, out) -> list[str]:
    sets = [*TINY_OVERRIDES, f"data.root={synth_root}", f"train.max_iters={ITERS}",
            f"train.checkpoint_period={PERIOD}", "train.log_period=1"]
    return ["train", "--workers", "2", *[a for s in sets for a in ("--set", s)], "--out", str(out),
            "--no-mlflow", "--no-progress"]


def _cmd(synth_root, out) -> list[str]:
    return [sys.executable, "-m", "ioulab.platform.cli", *_args(synth_root, out)]


def _env():
    return dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1")


def _children(pid: int) -> list[int]:
    """The child process ids of ``pid`` (Linux /proc)."""
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _final(run) -> dict[str, torch.Tensor]:
    return ckpt_io.load(ckpt_io.checkpoint_path(run / "checkpoints", ITERS))["model"]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_two_workers_sigkill_then_resume_exactly(synth_root, tmp_path):
    straight = subprocess.run(_cmd(synth_root, tmp_path / "straight"), cwd=tmp_path, env=_env(),
                              capture_output=True, text=True, timeout=900)
    assert straight.returncode == 0, straight.stderr[-3000:]
    run = tmp_path / "run"
    proc = subprocess.Popen(_cmd(synth_root, run), cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 900
        first = ckpt_io.checkpoint_path(run / "checkpoints", PERIOD)
        while not (first.exists() and len(_logged(run)) >= PERIOD + 2):
            assert proc.poll() is None, f"training ended before the kill: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "training too slow to reach the kill point"
            time.sleep(0.02)
        workers = _children(proc.pid)
        assert workers, "no worker process"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 30
    while any(map(_running, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(_running, workers)), f"worker processes outlived the killed run: {workers}"
    newest = ckpt_io.checkpoint_iteration(ckpt_io.latest_checkpoint(run / "checkpoints"))
    assert max(_logged(run)) > newest  # iterations after the last checkpoint were logged, then lost

    done = subprocess.run([*_cmd(synth_root, run), "--resume"], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _logged(run) == list(range(1, ITERS + 1))
    expected, got = _final(tmp_path / "straight"), _final(run)
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(got[k], v), k
    assert f"(resumed at {newest})" in done.stdout
