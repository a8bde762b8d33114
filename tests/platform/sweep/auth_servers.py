"""The cluster recipe's MLflow server (``platform/deploy/mlflow-server.sh``, basic-auth) on 127.0.0.1
with its own port and folders, for the tests that run what a user runs."""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
from pathlib import Path

from tests.platform.sweep.conftest import REPO, free_port, wait_for_http

SCRIPT = REPO / "platform" / "deploy" / "mlflow-server.sh"


class AuthMlflowServer:
    """``mlflow-server.sh STATE ARTIFACTS 127.0.0.1 PORT --workers 1`` in its own process group.

    ``credentials`` is the environment a client needs (MLFLOW_TRACKING_USERNAME / _PASSWORD)."""

    def __init__(self, folder: Path):
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.state, self.artifacts = folder / "mlflow_state", folder / "mlflow_artifacts"
        self.username, self.password = "ioulab-admin", secrets.token_hex(12)
        self.credentials = {"MLFLOW_TRACKING_USERNAME": self.username, "MLFLOW_TRACKING_PASSWORD": self.password}
        self.log = folder / "mlflow_server.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env.update(MLFLOW_AUTH_ADMIN_USERNAME=self.username, MLFLOW_AUTH_ADMIN_PASSWORD=self.password)
        self.proc = subprocess.Popen([str(SCRIPT), str(self.state), str(self.artifacts), "127.0.0.1",
                                      str(self.port), "--workers", "1"],
                                     env=env, stdout=self.log.open("a"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_for_http(f"{self.uri}/health", self.proc, self.log, timeout, "mlflow-server.sh")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
