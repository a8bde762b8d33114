"""GPU decisions of a sweep without a GPU: the trial's device and CUDA memory cap, and the
resource pre-check (fail, or warn on a cluster that can grow)."""
from __future__ import annotations

import pytest
import ray
import torch

from ioulab.platform.sweep import driver, trainable
from ioulab.platform.sweep.driver import SweepError
from ioulab.platform.sweep.space import load_space
from tests.platform.sweep.conftest import SPACES


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch sees a GPU; memory caps are recorded instead of applied."""
    caps = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, device=None: caps.append((f, device)))
    return caps


def test_memory_fraction_is_the_share_of_one_gpu():
    assert trainable.memory_fraction(0.25) == 0.25
    assert trainable.memory_fraction(1.0) is None and trainable.memory_fraction(0.0) is None
    assert trainable.memory_fraction(2.0) is None


def test_a_quarter_gpu_evaluation_caps_its_cuda_memory(fake_cuda):
    assert trainable.place_trial("auto", 0.25) == "cuda"
    assert fake_cuda == [(0.25, torch.device("cuda"))]


def test_a_whole_gpu_training_is_not_capped(fake_cuda):
    assert trainable.place_trial("auto", 1.0) == "cuda"
    assert fake_cuda == []


def test_a_trial_without_a_gpu_share_stays_on_cpu_even_if_the_node_has_one(fake_cuda):
    assert trainable.place_trial("auto", 0.0) == "cpu"
    assert fake_cuda == []


def test_a_gpu_share_without_cuda_runs_on_cpu_uncapped(monkeypatch):
    """A cluster that declares GPUs it does not have (the fake-GPU test cluster)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda *a, **k: pytest.fail("no CUDA: nothing to cap"))
    assert trainable.place_trial("auto", 0.25) == "cpu"


def test_an_explicit_device_is_kept(fake_cuda):
    assert trainable.trial_device("cpu", 1.0) == "cpu"
    assert trainable.place_trial("cuda:0", 0.5) == "cuda:0"
    assert fake_cuda == [(0.5, torch.device("cuda:0"))]


# -- the resource pre-check --------------------------------------------------------------------
CPU_NODES = [{"CPU": 1.0, "memory": 1e9}, {"CPU": 16.0}]
GPU_NODE = {"CPU": 16.0, "GPU": 2.0}


@pytest.fixture
def r50_plan():
    return load_space(SPACES / "nms.yaml", profile="r50")


def test_shortfall_names_the_stage_and_the_largest_node(r50_plan):
    assert driver.resource_shortfall(r50_plan, [*CPU_NODES, GPU_NODE]) is None
    message = driver.resource_shortfall(r50_plan, CPU_NODES)
    assert message.endswith("a train trial needs 8 CPUs and 1 GPUs on one node; the largest node has 16 CPUs and 0 GPUs")


def _cluster(monkeypatch, nodes, autoscales):
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": n} for n in nodes])
    monkeypatch.setattr(driver, "autoscaler_running", lambda: autoscales)


def test_a_gpu_profile_on_a_fixed_cpu_cluster_fails_in_one_line(monkeypatch, r50_plan):
    _cluster(monkeypatch, CPU_NODES, autoscales=False)
    with pytest.raises(SweepError) as err:
        driver._check_resources(r50_plan, allow_pending=False)
    assert "needs 8 CPUs and 1 GPUs" in str(err.value) and "--allow-pending" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("allow_pending, autoscales", [(True, False), (False, True)])
def test_a_cluster_that_can_grow_gets_a_warning(monkeypatch, capsys, r50_plan, allow_pending, autoscales):
    _cluster(monkeypatch, CPU_NODES, autoscales=autoscales)
    driver._check_resources(r50_plan, allow_pending=allow_pending)
    err = capsys.readouterr().err
    assert "warning:" in err and "needs 8 CPUs and 1 GPUs" in err
    assert ("--allow-pending" if allow_pending else "the cluster autoscales") in err


def test_autoscaler_status_read_only_vs_configured_node_types():
    """`ray start` clusters run a monitor with Ray's read-only provider: its node types are the
    node ids. An autoscaling config names its types (here: a GPU type being launched)."""
    node = "node_319d2de110850a73029da9e8f2748764ce9cad0dc74ac249d8c307ed"
    fixed = {"autoscaler_report": {"active_nodes": {node: 1}, "idle_nodes": None, "pending_nodes": [],
                                   "pending_launches": {}, "failed_nodes": []}}
    assert not driver.autoscaling_node_types(fixed)
    assert not driver.autoscaling_node_types({"load_metrics_report": {}})
    growing = {"autoscaler_report": {"active_nodes": {"head": 1}, "idle_nodes": None, "pending_nodes": [],
                                     "pending_launches": {"gpu_worker": 1}, "failed_nodes": []}}
    assert driver.autoscaling_node_types(growing)


@pytest.mark.parametrize("space", sorted(p.name for p in SPACES.glob("*.yaml")
                                         if "r50:" in p.read_text()))
def test_r50_profiles_train_on_one_gpu_and_evaluate_on_a_quarter(space):
    plan = load_space(SPACES / space, profile="r50")
    if plan.train_points:
        assert plan.train.resources.gpu == 1
    if plan.eval_points:
        assert plan.eval.resources.gpu == 0.25
