"""The cluster recipe's MLflow server with authentication (``platform/deploy/mlflow-server.sh``:
``mlflow server --app-name basic-auth --allowed-hosts ...``): clients without the credentials are
refused, and a sweep given them through the environment, as a user runs it, logs its runs."""
from __future__ import annotations

import base64
import os
import subprocess
import textwrap
import urllib.error
import urllib.request

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ioulab.platform.tracking import MlflowRun, TrackingAuthError
from tests.platform.sweep.auth_servers import AuthMlflowServer
from tests.platform.sweep.conftest import REPO, cli_sets, ioulab_cmd, runs_of

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    mlflow = AuthMlflowServer(tmp_path_factory.mktemp("mlflow_auth"))
    try:
        mlflow.start()
        yield mlflow
    finally:
        mlflow.stop()


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    """No MLflow credentials in the environment, nor in ~/.mlflow/credentials (a temp HOME; the
    caches, e.g. the built extension, stay where they are)."""
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"))
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def status(url: str, user: str | None = None, password: str | None = None, host: str | None = None) -> int:
    request = urllib.request.Request(url)
    if user is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    if host is not None:
        request.add_header("Host", host)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


@pytest.mark.timeout(300)
def test_clients_without_the_credentials_are_refused(server, no_credentials):
    url = f"{server.uri}/api/2.0/mlflow/experiments/search?max_results=1"
    assert status(url) == 401
    assert status(url, server.username, "not-the-password") == 401
    assert status(url, server.username, server.password) == 200
    # --allowed-hosts: a Host header the server was not started for is refused (DNS rebinding)
    assert status(url, server.username, server.password, host=f"attacker.example:{server.port}") == 403

    with pytest.raises(MlflowException) as refused:
        MlflowClient(server.uri).search_experiments()
    assert refused.value.error_code == "UNAUTHENTICATED"
    # ioulab's tracker fails at once with what to set, instead of buffering as if the server were down
    with pytest.raises(TrackingAuthError, match="MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"):
        MlflowRun(server.uri, "ioulab", run_name="refused")


SPACE = """
    name: authsweep
    base: cpu_tiny
    variants:
      - {model.roi_heads.box_loss.type: smooth_l1}
      - {model.roi_heads.box_loss.type: giou, model.roi_heads.box_loss.weight: 12.0}
    resources: {cpu: 1, gpu: 0}
    concurrency: 2
"""


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sweep_with_credentials_from_the_environment_logs_its_runs(server, tiny_sets, tmp_path, no_credentials,
                                                                     monkeypatch):
    space = tmp_path / "authsweep.yaml"
    space.write_text(textwrap.dedent(SPACE))

    def cmd(storage: str) -> list[str]:
        return [*ioulab_cmd(), "sweep", str(space), "--storage", str(tmp_path / storage),
                "--tracking-uri", server.uri, "--quiet", *cli_sets(tiny_sets)]

    env = dict(os.environ, TQDM_DISABLE="1")

    # Without credentials: one line naming the variables, before any trial (exit 2, no traceback).
    out = subprocess.run(cmd("refused"), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    assert "refused a client without credentials" in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]

    # With them in the environment (the local Ray's workers inherit it): every record sent live.
    out = subprocess.run(cmd("ray_results"), cwd=REPO, env={**env, **server.credentials}, capture_output=True, text=True,
                         timeout=600)
    log = out.stdout[-4000:] + out.stderr[-4000:]
    assert out.returncode == 0, log
    assert "warning: MLflow" not in out.stdout + out.stderr, log  # no trial fell back to buffering
    assert not list((tmp_path / "ray_results" / "authsweep" / "mlflow_spool").glob("*.jsonl"))

    for key, value in server.credentials.items():
        monkeypatch.setenv(key, value)
    client, parents, children = runs_of(server.uri)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert {c.data.params["model.roi_heads.box_loss.type"] for c in children} == {"smooth_l1", "giou"}
    for child in children:
        assert {"AP", "AP50", "AP75"} <= set(child.data.metrics)
        steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, "loss/total"))
        assert steps == [1, 2, 3, 4]  # every step, once
        assert {"config.yaml", "metrics.json"} <= {a.path for a in client.list_artifacts(child.info.run_id)}
