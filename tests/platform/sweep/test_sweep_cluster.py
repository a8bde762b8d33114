"""Sweeps on a 2-worker-node local Ray cluster: placement on both nodes, the MLflow naming
contract, eval-only grids, node loss mid-sweep, and a driver killed and resumed."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
from ray.tune import Callback

from ioulab.detector import config as C
from ioulab.platform.sweep.checkpoint_source import resolve_checkpoint
from ioulab.platform.sweep.driver import SweepError, SweepOptions, run_sweep
from ioulab.platform.sweep.space import load_space
from tests.platform.sweep.conftest import SPACES, cli_sets, ioulab_cmd, runs_of, smoke_trials

pytestmark = pytest.mark.cluster

SMOKE_TRIALS = smoke_trials()
METRIC_KEYS = ["AP", "AP50", "AP60", "AP70", "AP75", "AP80", "AP90"]


def options(tmp_path, **kw) -> SweepOptions:
    return SweepOptions(storage=str(tmp_path / "ray_results"), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                        verbose=0, mlflow_wait=60, **kw)


def test_smoke_grid_on_two_nodes_follows_the_mlflow_contract(ray_cluster, tiny_sets, tmp_path):
    plan = load_space(SPACES / "smoke.yaml", tiny_sets)
    outcome = run_sweep(plan, options(tmp_path))
    assert [t.status for t in outcome.trials] == ["FINISHED"] * SMOKE_TRIALS
    nodes = {n for t in outcome.trials for n in t.node_ids}
    assert nodes == ray_cluster.worker_ids()  # two concurrent trials, one per 1-CPU node
    assert all(len(t.node_ids) == 1 for t in outcome.trials)

    client, parents, children = runs_of(outcome.tracking_uri)
    (parent,) = parents
    tags = parent.data.tags
    assert tags["ioulab.sweep"] == "smoke" and tags["ioulab.space_file"] == str(SPACES / "smoke.yaml")
    assert len(tags["ioulab.git_commit"]) == 40 or tags["ioulab.git_commit"] == "unknown"
    assert json.loads(tags["ioulab.varying_keys"]) == plan.varying_keys == [
        "model.roi_heads.box_loss.type", "model.roi_heads.box_loss.weight", "train.seed"]
    assert json.loads(tags["ioulab.baseline"]) == {"model.roi_heads.box_loss.type": "smooth_l1",
                                                   "model.roi_heads.box_loss.weight": 1.0}
    assert parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"summary.md", "summary.json"}
    assert tags["ioulab.best_run_id"] == outcome.best.run_id and parent.data.metrics["best/AP"] == outcome.best.metrics["AP"]

    assert len(children) == SMOKE_TRIALS and len({c.data.tags["ray.trial_id"] for c in children}) == SMOKE_TRIALS
    by_trial = {c.data.tags["ray.trial_id"]: c for c in children}
    max_iters = C.load_config("cpu_tiny", tiny_sets).train.max_iters
    for trial in outcome.trials:
        run = by_trial[trial.trial_id]
        t = run.data.tags
        assert t["ioulab.role"] == "trial" and t["ioulab.sweep"] == "smoke" and t["ioulab.stage"] == "train"
        assert t["mlflow.parentRunId"] == parent.info.run_id and t["ioulab.trial_status"] == "FINISHED"
        assert run.info.status == "FINISHED" and run.info.run_id == trial.run_id
        assert json.loads(t["ioulab.node_ids"]) == trial.node_ids
        # params: the trial's full flattened config, dotted keys
        expected = C.flatten(C.load_config("cpu_tiny", [*tiny_sets, *[f"{k}={v}" for k, v in trial.values.items()]]))
        for key in ("model.roi_heads.box_loss.type", "model.roi_heads.box_loss.weight", "train.seed", "data.root"):
            assert run.data.params[key] == str(expected[key])
        assert set(run.data.params) == set(expected)
        assert set(METRIC_KEYS) <= set(run.data.metrics)
        assert run.data.metrics["AP"] == pytest.approx(trial.metrics["AP"])
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss/total")]
        assert sorted(steps) == list(range(1, max_iters + 1))
        assert {"loss/box_reg", "loss/classifier"} <= set(run.data.metrics)
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.yaml", "metrics.json"}
        assert Path(t["ioulab.checkpoint"]).is_file()
    summary = json.loads((Path(outcome.experiment_dir) / "summary.json").read_text())
    assert summary["best"]["run_id"] == outcome.best.run_id and len(summary["trials"]) == SMOKE_TRIALS


def test_eval_only_grid_trains_once_then_evaluates_a_given_checkpoint(ray_cluster, tiny_sets, tmp_path):
    space = tmp_path / "beta.yaml"
    space.write_text(textwrap.dedent("""
        base: cpu_tiny
        train: {set: {model.roi_heads.box_loss.type: diou, model.roi_heads.box_loss.weight: 12.0}}
        set: {inference.nms.type: diou}
        grid: {inference.nms.beta: [0.6, 0.8, 1.0]}
        concurrency: 2
    """))
    outcome = run_sweep(load_space(space, tiny_sets), options(tmp_path))
    trains = [t for t in outcome.trials if t.stage == "train"]
    evals = [t for t in outcome.trials if t.stage == "eval"]
    assert len(trains) == 1 and len(evals) == 3
    assert all(t.status == "FINISHED" for t in outcome.trials)
    # exactly one training: one Tune trial folder, one training run; evaluations log no losses
    assert len([p for p in (Path(outcome.experiment_dir) / "train").iterdir() if p.is_dir()]) == 1
    client, (parent,), children = runs_of(outcome.tracking_uri)
    train_runs = [c for c in children if c.data.tags["ioulab.stage"] == "train"]
    eval_runs = [c for c in children if c.data.tags["ioulab.stage"] == "eval"]
    assert len(train_runs) == 1 and len(eval_runs) == 3
    (train_run,) = train_runs
    assert json.loads(parent.data.tags["ioulab.varying_keys"]) == ["inference.nms.beta"]
    for run in eval_runs:
        assert run.data.tags["ioulab.checkpoint"] == trains[0].checkpoint == train_run.data.tags["ioulab.checkpoint"]
        assert run.data.tags["ioulab.train_run_id"] == train_run.info.run_id
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert not any(k.startswith("loss/") for k in run.data.metrics) and set(METRIC_KEYS) <= set(run.data.metrics)
        assert run.data.params["model.roi_heads.box_loss.type"] == "diou"  # the trained model's config
        # where the AP goes: every evaluation logs the breakdown and its files (issue 17)
        assert {"err/loc", "err/n_miss", "err/coco_c75"} <= set(run.data.metrics)
        assert {"errors.json", "pr_curves.png"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert sorted(float(r.data.params["inference.nms.beta"]) for r in eval_runs) == [0.6, 0.8, 1.0]
    # what it cost: each trial's seconds x its stage's resources (1 CPU here), the parent's total
    for run in children:
        assert run.data.metrics["cost/cpu_hours"] == pytest.approx(run.data.metrics["cost/wall_seconds"] / 3600)
        assert run.data.metrics["time/infer_ms_per_image"] > 0   # and the forward time of its evaluation
    assert parent.data.metrics["cost/cpu_hours"] == pytest.approx(
        sum(r.data.metrics["cost/cpu_hours"] for r in children)) and parent.data.metrics["cost/cpu_hours"] > 0
    exp = client.get_experiment(parent.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"   # opens on the runs table

    # The same grid on that checkpoint, named by its MLflow run: no training at all.
    plan = load_space(space, tiny_sets, name="beta-again", checkpoint=f"mlflow:{train_run.info.run_id}")
    ref = resolve_checkpoint(plan.checkpoint, plan.space_file, outcome.tracking_uri)
    assert ref == trains[0].checkpoint  # found through the run's ioulab.checkpoint tag
    again = run_sweep(plan, options(tmp_path, checkpoint_ref=ref))
    assert [t.stage for t in again.trials] == ["eval"] * 3 and not (Path(again.experiment_dir) / "train").exists()
    assert {t.metrics["AP"] for t in again.trials} == {t.metrics["AP"] for t in evals}  # same model, same points


def test_a_failing_trial_ends_failed_and_its_evaluation_is_skipped(ray_cluster, tiny_sets, tmp_path):
    space = tmp_path / "diverge.yaml"
    space.write_text(textwrap.dedent("""
        grid: {train.lr: [0.02, 1.0e+9], inference.nms.type: [diou]}
        max_failures: 0
        concurrency: 2
    """))
    outcome = run_sweep(load_space(space, tiny_sets), options(tmp_path))
    by_lr = {t.values["train.lr"]: t for t in outcome.trials if t.stage == "train"}
    assert by_lr[0.02].status == "FINISHED" and by_lr[1e9].status == "FAILED"
    assert "NonFiniteLossError" in by_lr[1e9].error
    (evaluation,) = [t for t in outcome.trials if t.stage == "eval"]  # only the trained model's
    assert evaluation.train_trial_id == by_lr[0.02].trial_id and evaluation.status == "FINISHED"
    client, (parent,), children = runs_of(outcome.tracking_uri)
    failed = [c for c in children if c.data.tags["ray.trial_id"] == by_lr[1e9].trial_id]
    assert len(children) == 3 and len(failed) == 1
    assert failed[0].info.status == "FAILED" and failed[0].data.tags["ioulab.trial_status"] == "FAILED"
    assert parent.data.tags["ioulab.trials_failed"] == "1"


def test_gpu_profile_on_a_cpu_cluster_fails_before_any_trial(ray_cluster, tmp_path):
    plan = load_space(SPACES / "box_loss.yaml", profile="r50")
    with pytest.raises(SweepError, match="needs 8 CPUs and 1 GPUs on one node"):
        run_sweep(plan, options(tmp_path))
    assert not (tmp_path / "ray_results").exists()  # no sweep state, no Tune experiment
    _, parents, children = runs_of(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert not parents and not children


class RemoveNodeOnFirstCheckpoint(Callback):
    """Tune callback (driver side): kill the node of the first trial that reports a checkpoint."""

    cluster = None  # set by the test (a callback is pickled with the Tuner: no live objects inside)

    def __init__(self):
        self.removed = None

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.removed is None and result.get("iteration", 0) >= 2 and not result.get("final"):
            self.removed = result["node_id"]
            RemoveNodeOnFirstCheckpoint.cluster.remove_worker(self.removed)


def test_node_lost_mid_sweep(ray_cluster, tiny_sets, tmp_path):
    plan = load_space(SPACES / "smoke.yaml", [*tiny_sets, "train.max_iters=20", "train.checkpoint_period=2"])
    RemoveNodeOnFirstCheckpoint.cluster = ray_cluster
    callback = RemoveNodeOnFirstCheckpoint()
    try:
        outcome = run_sweep(plan, options(tmp_path), callbacks=[callback])
    finally:
        ray_cluster.ensure_two_workers()
    assert callback.removed is not None
    assert [t.status for t in outcome.trials] == ["FINISHED"] * SMOKE_TRIALS
    moved = [t for t in outcome.trials if len(t.node_ids) > 1]
    assert moved and all(t.node_ids[0] == callback.removed for t in moved)  # resumed on the other node
    client, parents, children = runs_of(outcome.tracking_uri)
    assert len(parents) == 1 and len(children) == SMOKE_TRIALS
    assert sorted(c.data.tags["ray.trial_id"] for c in children) == sorted(t.trial_id for t in outcome.trials)
    for run in children:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss/total")]
        assert sorted(steps) == list(range(1, 21))  # every step once, none lost, none twice
        assert run.info.status == "FINISHED" and run.data.tags["ioulab.trial_status"] == "FINISHED"


def _finished_runs(uri: str, state: Path) -> dict:
    """The child runs marked FINISHED, once the driver has created the database and the parent run
    (reading earlier would race the driver's creation of the MLflow tables)."""
    if not state.exists() or not json.loads(state.read_text()).get("parent_run_id"):
        return {}
    _, _, children = runs_of(uri)
    return {c.data.tags["ray.trial_id"]: c for c in children
            if c.info.status == "FINISHED" and c.data.tags.get("ioulab.trial_status") == "FINISHED"}


def test_driver_killed_then_resumed(ray_cluster, tiny_sets, tmp_path):
    args = [*ioulab_cmd(), "sweep", str(SPACES / "smoke.yaml"), "--address", ray_cluster.address,
            "--storage", str(tmp_path / "ray_results"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--quiet", *cli_sets([*tiny_sets, "train.max_iters=10"])]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = dict(os.environ, TQDM_DISABLE="1")
    state = tmp_path / "ray_results" / "smoke" / "sweep.json"
    log = (tmp_path / "first.log").open("w")
    driver = subprocess.Popen(args, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and driver.poll() is None and not _finished_runs(uri, state):
            time.sleep(0.3)
        assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
    finally:
        if driver.poll() is None:
            driver.kill()
    killed_at = time.time()
    before = _finished_runs(uri, state)
    assert 1 <= len(before) < SMOKE_TRIALS, "kill the driver mid-sweep"
    exp = tmp_path / "ray_results" / "smoke" / "train"

    time.sleep(2)  # the killed driver's trial actors go away with its job
    out = subprocess.run([*args, "--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    client, parents, children = runs_of(uri)
    assert len(parents) == 1 and len(children) == SMOKE_TRIALS  # nothing duplicated
    assert len({c.data.tags["ray.trial_id"] for c in children}) == SMOKE_TRIALS
    assert all(c.info.status == "FINISHED" and c.data.tags["ioulab.trial_status"] == "FINISHED" for c in children)
    after = {c.data.tags["ray.trial_id"]: c for c in children}
    for trial_id, run in before.items():  # finished before the kill: not run again
        assert after[trial_id].info.end_time == run.info.end_time < killed_at * 1000
        history = client.get_metric_history(run.info.run_id, "loss/total")
        assert sorted(m.step for m in history) == list(range(1, 11))
        assert max(m.timestamp for m in history) < killed_at * 1000
        # No training report after the kill: a trial that Tune's last snapshot still held as running
        # only re-reports the final result stored in its last checkpoint (restored_final).
        (folder,) = [p for p in exp.iterdir() if p.name.endswith(trial_id)]
        lines = [json.loads(x) for x in (folder / "result.json").read_text().splitlines()]
        assert all(x.get("restored_final") == 1 for x in lines if x["timestamp"] >= killed_at)
        assert sum(x["final"] == 1 and not x.get("restored_final") for x in lines) <= 1
    for run in children:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss/total")]
        assert sorted(steps) == list(range(1, 11))
