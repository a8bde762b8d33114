"""The GPU path of a sweep on the local cluster with a node that declares 2 fake GPUs (Ray
schedules them as real ones; torch sees no GPU, so the trials run on CPU): the r50 profiles'
resource shapes, checked from Ray's own records. And a node with another ioulab installed."""
from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
from ray.tune import Callback

from ioulab.platform.sweep import codecheck
from ioulab.platform.sweep.driver import SweepError, autoscaler_running, run_sweep
from ioulab.platform.sweep.space import load_space
from tests.platform.sweep.conftest import REPO, SPACES, runs_of
from tests.platform.sweep.test_sweep_cluster import options

pytestmark = pytest.mark.cluster


class AddNodeAtStart(Callback):
    """Tune callback (driver side): add a node when the first stage starts, i.e. after the
    resource pre-check, as an autoscaler would once trials wait for it."""

    cluster = None       # set by the test (the callback is pickled with the Tuner)
    node_args: dict = {}
    added: list = []

    def setup(self, **info):
        if not AddNodeAtStart.added:
            node = AddNodeAtStart.cluster.cluster.add_node(node_ip_address="127.0.0.1", **AddNodeAtStart.node_args)
            AddNodeAtStart.added.append(node)


@pytest.fixture
def add_node_at_start(ray_cluster):
    def arm(**node_args):
        AddNodeAtStart.cluster, AddNodeAtStart.node_args, AddNodeAtStart.added = ray_cluster, node_args, []
        return AddNodeAtStart()

    yield arm
    for node in AddNodeAtStart.added:  # later tests expect the CPU-only cluster
        ray_cluster.cluster.remove_node(node, allow_graceful=True)
    AddNodeAtStart.added = []


def trial_results(stage_dir: Path) -> list[dict]:
    """The last result of every trial of a Tune experiment folder (result.json: Ray's record)."""
    out = []
    for folder in sorted(p for p in stage_dir.iterdir() if p.is_dir()):
        lines = (folder / "result.json").read_text().splitlines()
        out.append(json.loads(lines[-1]))
    return out


def actor_lifetimes(results: list[dict]) -> list[tuple[float, float]]:
    """(start, end) in ms of the actor that ran each trial, from the GCS actor table."""
    import ray._private.state

    actors = {(a["Pid"], a["Address"]["NodeID"]): a for a in ray._private.state.actors().values()}
    spans = []
    for r in results:
        actor = actors[(r["pid"], r["node_id"])]
        assert actor["State"] == "DEAD" and actor["EndTime"] > actor["StartTime"] > 0
        spans.append((actor["StartTime"], actor["EndTime"]))
    return spans


def peak_use(spans: list[tuple[float, float]], shares: list[float]) -> float:
    """The largest sum of ``shares`` over trials alive at one instant."""
    events = sorted([(s, 1, w) for (s, _), w in zip(spans, shares)] + [(e, 0, -w) for (_, e), w in zip(spans, shares)])
    level = peak = 0.0
    for _, _, w in events:  # at equal times an end (0) comes before a start (1)
        level += w
        peak = max(peak, level)
    return peak


@pytest.mark.slow
@pytest.mark.timeout(1200)  # ~2 min on an idle 2-core machine; 12 min measured under heavy shared load
def test_r50_resource_shapes_on_two_fake_gpus(ray_cluster, add_node_at_start, tiny_sets, tmp_path, capsys):
    r50 = load_space(SPACES / "nms.yaml", profile="r50")
    train_gpu, eval_gpu = r50.train.resources.gpu, r50.eval.resources.gpu
    assert (train_gpu, eval_gpu, r50.eval.concurrency) == (1, 0.25, 8)
    assert not autoscaler_running()  # the test cluster has no autoscaler: --allow-pending it is
    space = tmp_path / "gpu.yaml"
    space.write_text(textwrap.dedent(f"""
        base: cpu_tiny
        set: {{inference.nms.type: diou}}
        grid: {{train.seed: [0, 1, 2], inference.nms.beta: [0.6, 0.8, 1.0]}}
        train: {{resources: {{cpu: 1, gpu: {train_gpu}}}, concurrency: 8}}
        eval: {{resources: {{cpu: 0.5, gpu: {eval_gpu}}}, concurrency: {r50.eval.concurrency}}}
        max_failures: 0
    """))
    plan = load_space(space, tiny_sets)
    # No GPU node yet: the pre-check warns (--allow-pending) and the trials wait for the node.
    callback = add_node_at_start(num_cpus=8, num_gpus=2)
    outcome = run_sweep(plan, options(tmp_path, allow_pending=True), callbacks=[callback])
    assert "warning:" in capsys.readouterr().err
    assert [t.status for t in outcome.trials] == ["FINISHED"] * 12
    (gpu_node,) = AddNodeAtStart.added
    root = Path(outcome.experiment_dir)
    _, _, children = runs_of(outcome.tracking_uri)
    tags = {c.data.tags["ray.trial_id"]: c.data.tags for c in children}

    for stage, count, share, concurrency in (("train", 3, 1.0, 2), ("eval", 9, 0.25, 8)):
        results = trial_results(root / stage)
        assert len(results) == count
        for r in results:
            assert r["node_id"] == gpu_node.node_id
            assert r["gpu_share"] == share                       # Ray's assigned resources
            assert r["gpu_ids"] in ("0", "1") and r["cuda_visible_devices"] == r["gpu_ids"]
            assert r["device"] == "cpu"                          # torch sees no GPU: CPU it is
            assert tags[r["trial_id"]]["ioulab.gpu_ids"] == r["gpu_ids"]
            assert tags[r["trial_id"]]["ioulab.device"] == "cpu"
        spans = actor_lifetimes(results)
        for gpu in ("0", "1"):
            on_gpu = [(span, r["gpu_share"]) for span, r in zip(spans, results) if r["gpu_ids"] == gpu]
            assert on_gpu, (stage, gpu)  # both GPUs used
            # Never oversubscribed: the trials alive at once on one GPU hold at most all of it.
            assert peak_use([s for s, _ in on_gpu], [w for _, w in on_gpu]) <= 1.0 + 1e-9, (stage, gpu)
        peak = peak_use(spans, [1] * len(spans))
        if stage == "train":  # the stage's concurrency (8) and the CPUs allow more: the GPUs do not
            assert peak == 2
        else:  # more evaluations at once than GPUs (they share), at most four per GPU
            assert 4 < peak <= concurrency
            assert max(sum(r["gpu_ids"] == g for r in results) for g in ("0", "1")) >= 4


@pytest.mark.timeout(600)
def test_a_node_with_other_ioulab_code_fails_its_trial_once_naming_both(ray_cluster, add_node_at_start,
                                                                        tiny_sets, tmp_path):
    # The only GPU node has an edited copy of ioulab first on its workers' path.
    other = tmp_path / "other" / "ioulab"
    for label in codecheck.PACKAGES.values():
        shutil.copytree(REPO / label, other / label, ignore=shutil.ignore_patterns("__pycache__"))
    (other / "__init__.py").write_text("")
    config = other / "detector" / "config.py"
    config.write_text(config.read_text() + "# edited on this node only\n")
    node_commit = "f" * 40
    callback = add_node_at_start(num_cpus=1, num_gpus=1,
                                 env_vars={"PYTHONPATH": str(other.parent), "IOULAB_GIT_COMMIT": node_commit})
    space = tmp_path / "one.yaml"
    space.write_text("base: cpu_tiny\ngrid: {train.seed: [0, 1]}\nresources: {cpu: 1, gpu: 1}\nmax_failures: 2\n")
    plan = load_space(space, tiny_sets)
    with pytest.raises(SweepError) as err:
        run_sweep(plan, options(tmp_path, allow_pending=True), callbacks=[callback])
    message, driver = str(err.value), codecheck.code_identity()
    assert "\n" not in message
    assert f"node {AddNodeAtStart.added[0].node_id} runs ioulab" in message
    assert f"commit {node_commit[:12]}" in message and f"commit {driver.commit[:12]}, code {driver.digest}" in message
    for result_file in (tmp_path / "ray_results" / "one" / "train").glob("*/result.json"):
        attempts = [json.loads(x) for x in result_file.read_text().splitlines()]
        assert len(attempts) == 1 and attempts[0]["code_mismatch"] == message  # failed once, not retried
    summary = json.loads((tmp_path / "ray_results" / "one" / "summary.json").read_text())
    assert [t["status"] for t in summary["trials"]] == ["FAILED", "FAILED"]
    _, (parent,), children = runs_of(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert len(children) == 2
    assert all(c.info.status == "FAILED" and c.data.tags["ioulab.trial_status"] == "FAILED" for c in children)
