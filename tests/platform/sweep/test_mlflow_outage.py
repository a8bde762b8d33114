"""A real `mlflow server` (SQLite backend, artifacts folder) stopped while the trials train and
restarted after they ended: no trial dies and every metric ends up in MLflow."""
from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient  # imported here: two threads importing MLflow at once race

from ioulab.platform.sweep.driver import SweepOptions, run_sweep
from ioulab.platform.sweep.space import load_space
from tests.platform.sweep.conftest import free_port, runs_of, wait_for_http

pytestmark = pytest.mark.cluster


class MlflowServer:
    """`mlflow server` on 127.0.0.1 in its own process group (stopped by that group's id)."""

    def __init__(self, folder: Path):
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.cmd = ["mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                    "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
                    "--artifacts-destination", str(folder / "artifacts")]
        self.log = folder / "server.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> None:
        self.proc = subprocess.Popen(self.cmd, stdout=self.log.open("a"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_for_http(f"{self.uri}/health", self.proc, self.log, timeout, "mlflow server")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def test_mlflow_server_outage_loses_no_metric(ray_cluster, tiny_sets, tmp_path):
    server = MlflowServer(tmp_path)
    server.start()
    space = tmp_path / "outage.yaml"
    space.write_text(textwrap.dedent("""
        base: cpu_tiny
        set: {train.max_iters: 24, train.checkpoint_period: 6}
        variants:
          - {model.roi_heads.box_loss.type: smooth_l1}
          - {model.roi_heads.box_loss.type: giou, model.roi_heads.box_loss.weight: 12.0}
        concurrency: 2
    """))
    sets = [s for s in tiny_sets if not s.startswith(("train.max_iters", "train.checkpoint_period"))]
    plan = load_space(space, sets)
    finals = tmp_path / "ray_results" / plan.name / "train"
    times: dict[str, float] = {}

    def outage():
        client = MlflowClient(server.uri)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # a trial has created its child run: stop the server
            exp = client.get_experiment_by_name("ioulab")
            if exp and client.search_runs([exp.experiment_id], "tags.`ioulab.role` = 'trial'"):
                break
            time.sleep(0.2)
        times["stopped"] = time.time()  # SIGTERM: the server stops accepting connections at once
        server.stop()
        while time.monotonic() < deadline and len(list(finals.glob("*/checkpoint_*/final.json"))) < 2:
            time.sleep(0.5)  # both trials ended while the server was down
        times["trials_done"] = time.time()
        time.sleep(3)
        server.start()
        times["restarted"] = time.time()

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    try:
        outcome = run_sweep(plan, SweepOptions(storage=str(tmp_path / "ray_results"), tracking_uri=server.uri,
                                               verbose=0, mlflow_wait=240))
        thread.join(300)
        assert [t.status for t in outcome.trials] == ["FINISHED", "FINISHED"]  # no trial died
        assert outcome.mlflow_complete
        assert times["stopped"] < times["trials_done"] < times["restarted"]
        ended = [os.path.getmtime(p) for p in finals.glob("*/checkpoint_*/final.json")]
        assert len(ended) == 2 and all(times["stopped"] < t < times["restarted"] for t in ended), (times, ended)

        client, parents, children = runs_of(server.uri)
        assert len(parents) == 1 and len(children) == 2
        assert parents[0].info.status == "FINISHED"
        assert {"summary.md", "summary.json"} <= {a.path for a in client.list_artifacts(parents[0].info.run_id)}
        by_trial = {t.trial_id: t for t in outcome.trials}
        for run in children:
            trial = by_trial[run.data.tags["ray.trial_id"]]
            assert run.info.status == "FINISHED" and run.data.tags["ioulab.trial_status"] == "FINISHED"
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss/total")]
            assert sorted(steps) == list(range(1, 25))  # every step, once
            for key in ("AP", "AP50", "AP75", "AP90"):
                assert run.data.metrics[key] == pytest.approx(trial.metrics[key])
            assert run.data.params["model.roi_heads.box_loss.type"] == trial.values["model.roi_heads.box_loss.type"]
            assert {"config.yaml", "metrics.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
        assert not list((tmp_path / "ray_results" / plan.name / "mlflow_spool").glob("*.jsonl"))  # all replayed
    finally:
        server.stop()
