"""Trials of 2 DDP workers (``resources: {workers: 2}``: a Tune function trainable that fits a Ray
Train TorchTrainer, platform/sweep/ddp_trial.py) on the session's local Ray cluster: one MLflow
child run per trial whose every step is logged once, and a worker SIGKILLed mid-trial, after which the
trial finishes from its last checkpoint with every step still logged exactly once."""
from __future__ import annotations

import json
import os
import signal
import textwrap
import threading
import time
from pathlib import Path

import pytest

from ioulab.platform.sweep.driver import run_sweep
from ioulab.platform.sweep.space import load_space
from tests.platform.sweep.conftest import runs_of
from tests.platform.sweep.test_sweep_cluster import METRIC_KEYS, options

pytestmark = pytest.mark.cluster
ITERS = 8
RUN = [f"train.max_iters={ITERS}", "train.checkpoint_period=2", "train.log_period=1"]


def _space(tmp_path: Path, name: str, concurrency: int = 2) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: {name}
        base: cpu_tiny
        grid: {{train.seed: [1, 2]}}
        metric: AP
        train: {{resources: {{workers: 2, cpu: 0.45}}}}
        max_failures: 2
        concurrency: {concurrency}
        """))
    return path


def _final(trial) -> dict:
    """The trial's last result as its final checkpoint keeps it (``final.json`` next to the model)."""
    return json.loads((Path(trial.checkpoint).parent / "final.json").read_text())


def _check_one_child_each_steps_once(outcome) -> None:
    assert [t.status for t in outcome.trials] == ["FINISHED"] * 2
    assert all(set(METRIC_KEYS) <= set(t.metrics) and _final(t)["workers"] == 2 for t in outcome.trials)
    client, parents, children = runs_of(outcome.tracking_uri)
    assert len(parents) == 1 and len(children) == 2  # one child run per trial, not per worker or attempt
    assert sorted(c.data.tags["ray.trial_id"] for c in children) == sorted(t.trial_id for t in outcome.trials)
    for run in children:
        assert run.info.status == "FINISHED" and run.data.tags["ioulab.trial_status"] == "FINISHED"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss/total")]
        assert sorted(steps) == list(range(1, ITERS + 1))  # every step once, none lost, none twice
        assert set(METRIC_KEYS) <= set(run.data.metrics)


def test_two_worker_trial_one_child_run_steps_once(ray_cluster, tiny_sets, tmp_path):
    plan = load_space(_space(tmp_path, "ddp"), [*tiny_sets, *RUN])
    assert plan.train.resources.workers == 2 and plan.train.resources.as_tune() == {"cpu": 0.01, "gpu": 0}
    outcome = run_sweep(plan, options(tmp_path))
    _check_one_child_each_steps_once(outcome)


def _train_workers() -> list[int]:
    """Pids of Ray Train worker actors on this machine (their process title names the actor)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"RayTrainWorker" in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def test_worker_killed_mid_trial_finishes_from_checkpoint_steps_once(ray_cluster, tiny_sets, tmp_path):
    plan = load_space(_space(tmp_path, "ddpkill", concurrency=1), [*tiny_sets, *RUN])
    killed: list[int] = []

    uri = options(tmp_path).tracking_uri

    # One trial at a time: the workers alive when a trial passes its first checkpoint are its own.
    def past_first_checkpoint() -> bool:
        """The running trial logged step 3: its checkpoint of iteration 2 was saved and reported."""
        try:
            client, _, children = runs_of(uri)
            return any(m.step >= 3 for c in children for m in client.get_metric_history(c.info.run_id, "loss/total"))
        except Exception:  # noqa: BLE001 - the database is not created yet
            return False

    def kill_one_worker_after_first_checkpoint():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not killed:
            workers = _train_workers()
            if len(workers) >= 2 and past_first_checkpoint():
                os.kill(max(workers), signal.SIGKILL)
                killed.append(max(workers))
            time.sleep(0.3)

    killer = threading.Thread(target=kill_one_worker_after_first_checkpoint, daemon=True)
    killer.start()
    outcome = run_sweep(plan, options(tmp_path))
    killer.join(timeout=1)
    assert killed, "no worker was killed"
    _check_one_child_each_steps_once(outcome)
    # the killed worker's trial restarted from a checkpoint, not from 0
    assert max(_final(t)["resumed_from"] for t in outcome.trials) >= 2
