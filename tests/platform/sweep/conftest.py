"""One local Ray cluster for the sweep tests: a head with 0 CPUs and two 1-CPU worker nodes
(``ray.cluster_utils.Cluster``), so two concurrent trials land on two different nodes. Fast
health checks: a removed node is declared dead in ~3 s instead of ~15 s.

Everything listens on 127.0.0.1. Ray clients rewrite a loopback address to the machine's IP
(``resolve_ip_for_localhost``) unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, so that variable
is set for every process the tests start (and the constant it sets, in this process)."""
from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import TINY_OVERRIDES

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
REPO = Path(__file__).resolve().parents[3]
RAY_ADDRESS_FILE = Path("/tmp/ray/ray_current_cluster")  # Cluster() overwrites it: restored after
SPACES = REPO / "search_spaces"


def smoke_trials() -> int:
    """How many trainings search_spaces/smoke.yaml runs (2 box losses x its seeds)."""
    from ioulab.platform.sweep.space import load_space

    return len(load_space(SPACES / "smoke.yaml").train_points)


def wait_for_http(url: str, proc, log: Path, timeout: float, what: str) -> None:
    """Poll ``url`` until it answers 200; fail with the log's tail if ``proc`` dies or time runs out."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, Path(log).read_text()[-3000:]
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{what} did not come up: {Path(log).read_text()[-3000:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    def __init__(self):
        import ray
        import ray._private.ray_constants as ray_constants
        from ray.cluster_utils import Cluster

        ray_constants.ENABLE_RAY_CLUSTER = False  # in case ray was imported before this file
        self.saved_address = RAY_ADDRESS_FILE.read_text() if RAY_ADDRESS_FILE.exists() else None

        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False,
            "_system_config": {"health_check_period_ms": 1000, "health_check_timeout_ms": 1000,
                               "health_check_failure_threshold": 2, "health_check_initial_delay_ms": 0}})
        self.workers = [self.add_worker() for _ in range(2)]
        self.cluster.wait_for_nodes()
        ray.init(address=self.cluster.address, logging_level="WARNING")

    @property
    def address(self) -> str:
        return self.cluster.address

    def add_worker(self):
        node = self.cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        return node

    def worker_ids(self) -> set[str]:
        return {n.node_id for n in self.workers}

    def remove_worker(self, node_id: str):
        (node,) = [n for n in self.workers if n.node_id == node_id]
        self.cluster.remove_node(node, allow_graceful=False)
        self.workers.remove(node)

    def ensure_two_workers(self):
        import ray

        while len(self.workers) < 2:
            self.workers.append(self.add_worker())
        self.cluster.wait_for_nodes()
        deadline = time.monotonic() + 60
        while ray.cluster_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)

    def shutdown(self):
        import ray

        ray.shutdown()
        self.cluster.shutdown()
        if self.saved_address is None:
            RAY_ADDRESS_FILE.unlink(missing_ok=True)
        else:
            RAY_ADDRESS_FILE.write_text(self.saved_address)


@pytest.fixture(scope="session")
def ray_cluster():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cluster = LocalCluster()
    try:
        yield cluster
    finally:
        cluster.shutdown()


@pytest.fixture
def tiny_sets(synth_root):
    """--set overrides for seconds-long trials on the session's tiny dataset."""
    return [f"data.root={synth_root}", *TINY_OVERRIDES]


def cli_sets(overrides) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def ioulab_cmd() -> list[str]:
    return [sys.executable, "-m", "ioulab.platform.cli"]


def runs_of(uri: str, experiment: str = "ioulab"):
    """(parent runs, child runs) of an MLflow experiment."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000) if exp else []
    parents = [r for r in runs if r.data.tags.get("ioulab.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("ioulab.role") == "trial"]
    return client, parents, children
