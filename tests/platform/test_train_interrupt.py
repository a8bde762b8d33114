"""A real Ctrl-C (SIGINT) and real SIGKILLs of an `ioulab train` process, then `--resume`: the
final weights equal an uninterrupted run's and `log.jsonl` holds every iteration exactly once."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from ioulab.detector.engine import checkpoint_file as ckpt_io
from tests.conftest import TINY_OVERRIDES

ITERS, PERIOD = 40, 10
# Kills itself with SIGKILL inside the second checkpoint save (after the data is written, before
# the rename): what a node failure or the OOM killer does at the worst moment.
KILL_IN_SECOND_SAVE = """
import os, signal, sys
from ioulab.detector.engine import checkpoint_file as checkpoint
from ioulab.platform import cli

calls, real_fsync = [], os.fsync
def fsync(fd):
    calls.append(fd)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    real_fsync(fd)
checkpoint.os.fsync = fsync
sys.exit(cli.main(sys.argv[1:]))
"""


def _args(synth_root, out) -> list[str]:
    sets = [*TINY_OVERRIDES, f"data.root={synth_root}", f"train.max_iters={ITERS}",
            f"train.checkpoint_period={PERIOD}", "train.log_period=1"]
    return ["train", *[a for s in sets for a in ("--set", s)], "--out", str(out), "--no-mlflow", "--no-progress"]


def _env():
    return dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1")


def _run(args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ioulab.platform.cli", *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=900)


def _logged(run) -> list[int]:
    path = run / "log.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line)["iteration"])
        except ValueError:
            pass  # the line being written when the process died
    return out


def _final_weights(run) -> dict[str, torch.Tensor]:
    state = ckpt_io.load(ckpt_io.checkpoint_path(run / "checkpoints", ITERS))
    assert state["iteration"] == ITERS
    return state["model"]


@pytest.fixture(scope="module")
def straight(synth_root, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("straight")
    done = _run(_args(synth_root, cwd / "run"), cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return _final_weights(cwd / "run")


def _resume_and_compare(synth_root, run, straight, cwd):
    done = _run([*_args(synth_root, run), "--resume"], cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _logged(run) == list(range(1, ITERS + 1))
    weights = _final_weights(run)
    assert weights.keys() == straight.keys()
    for k, v in straight.items():
        assert torch.equal(weights[k], v), k
    assert not list((run / "checkpoints").glob(".*.tmp"))
    # the summary names what this call ran, not the schedule's total
    resumed_at = json.loads((run / "timing.json").read_text())["resumed_from"]
    assert 0 < resumed_at < ITERS
    assert f"trained iterations {resumed_at + 1}-{ITERS} of {ITERS} (resumed at {resumed_at})" in done.stdout
    return done


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_signal_between_checkpoints_then_resume(sig, synth_root, straight, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "ioulab.platform.cli", *_args(synth_root, run)],
                            cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # Wait until the first checkpoint is on disk and iterations after it are logged.
        deadline = time.monotonic() + 900
        first = ckpt_io.checkpoint_path(run / "checkpoints", PERIOD)
        while not (first.exists() and len(_logged(run)) >= PERIOD + 3):  # cheap test first: the
            # trainer shares the CPU with this loop
            assert proc.poll() is None, f"training ended before the kill: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "training too slow to reach the kill point"
            time.sleep(0.02)
        proc.send_signal(sig)
        rc = proc.wait(timeout=60)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc != 0, "the process finished before the signal arrived"
    if sig == signal.SIGINT:
        assert "KeyboardInterrupt" in err
    newest = ckpt_io.checkpoint_iteration(ckpt_io.latest_checkpoint(run / "checkpoints"))
    # The situation that used to duplicate log lines: iterations logged after the last checkpoint.
    assert max(_logged(run)) > newest
    _resume_and_compare(synth_root, run, straight, tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_sigkill_during_checkpoint_save_then_resume(synth_root, straight, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", KILL_IN_SECOND_SAVE, *_args(synth_root, run)],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ckpts = run / "checkpoints"
    assert [p.name for p in ckpt_io.list_checkpoints(ckpts)] == ["model_0000010.pth"]
    (tmp,) = ckpts.glob(".model_0000020.pth.*.tmp")  # what the kill left behind
    assert _logged(run)[-1] == 2 * PERIOD
    done = _resume_and_compare(synth_root, run, straight, tmp_path)
    assert not tmp.exists()
    assert "removed 1 unfinished checkpoint file" in done.stderr
