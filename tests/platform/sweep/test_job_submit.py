"""`ray job submit --working-dir . -- ioulab sweep search_spaces/smoke.yaml` end to end against a
`ray start --head` cluster on loopback (the job server needs ray[default]), with Ray token
authentication on, the token given as README.md says (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN)."""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.platform.sweep.conftest import REPO, cli_sets, free_port, runs_of, smoke_trials

pytestmark = pytest.mark.cluster


class RayHead:
    """`ray start --head --block` on 127.0.0.1 with its own ports and temp dir; stopped by
    signalling its process group (``ray stop`` would stop every Ray on the machine)."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.temp_dir = tempfile.mkdtemp(prefix="ioulab-ray-", dir="/tmp")  # short: socket paths
        self.port, self.dashboard_port = free_port(), free_port()
        ports = {"--ray-client-server-port": free_port(), "--dashboard-agent-listen-port": free_port(),
                 "--dashboard-agent-grpc-port": free_port(), "--metrics-export-port": free_port(),
                 "--runtime-env-agent-port": free_port(), "--node-manager-port": free_port(),
                 "--object-manager-port": free_port()}
        self.cmd = ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={self.port}",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}", "--num-cpus=2",
                    "--include-dashboard=true", f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
                    *[f"{k}={v}" for k, v in ports.items()]]
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.log = os.path.join(self.temp_dir, "ray_start.log")
        self.proc = subprocess.Popen(self.cmd, stdout=open(self.log, "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True, env=env)

    def wait(self, timeout: float = 120) -> None:
        """Until the Jobs API answers (with the token: it answers 401 to everyone else)."""
        deadline = time.monotonic() + timeout
        request = urllib.request.Request(f"{self.address}/api/version",
                                         headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, Path(self.log).read_text()[-3000:]
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"ray start --head did not come up: {Path(self.log).read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # --block: ray start stops the processes it started
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def auth_env(token: str | None, home) -> dict[str, str]:
    """The environment of a `ray` command: token auth on with ``token``, or a client that has no
    token (auth mode unset, a HOME without ~/.ray/auth_token). Never the user's ~/.ray/auth_token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["TQDM_DISABLE"] = "1"
    if token is None:
        return {**env, "HOME": str(home)}
    return {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}


def test_ray_job_submit_runs_the_sweep(tiny_sets, tmp_path):
    user_token = Path.home() / ".ray" / "auth_token"
    before = user_token.read_bytes() if user_token.exists() else None
    token = secrets.token_hex(32)
    head = RayHead(auth_env(token, tmp_path))
    try:
        head.wait()
        storage, db = tmp_path / "ray_results", tmp_path / "mlflow.db"
        cmd = ["ray", "job", "submit", "--address", head.address, "--working-dir", ".", "--",
               "ioulab", "sweep", "search_spaces/smoke.yaml", "--storage", str(storage),
               "--tracking-uri", f"sqlite:///{db}", "--quiet", *cli_sets(tiny_sets)]

        # Refused: no token, and a wrong one (the Jobs API would otherwise run anyone's code).
        (tmp_path / "home").mkdir()
        for env, answer in ((auth_env(None, tmp_path / "home"), "Authentication required"),
                            (auth_env("0" * 64, tmp_path), "Authentication failed")):
            out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
            assert out.returncode != 0 and answer in out.stdout + out.stderr, out.stdout[-2000:] + out.stderr[-2000:]
        assert not storage.exists()

        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=420,
                             env=auth_env(token, tmp_path))
        log = out.stdout[-4000:] + out.stderr[-2000:]
        assert out.returncode == 0, log
        assert re.search(r"Job 'raysubmit_\w+' succeeded", out.stdout + out.stderr), log
        assert f"sweep smoke: {smoke_trials()} trials" in out.stdout, log

        summary = json.loads((storage / "smoke" / "summary.json").read_text())
        assert [t["status"] for t in summary["trials"]] == ["FINISHED"] * smoke_trials()
        _, (parent,), children = runs_of(f"sqlite:///{db}")
        assert parent.data.tags["ioulab.space_file"] == "search_spaces/smoke.yaml"
        assert re.fullmatch(r"[0-9a-f]{40}", parent.data.tags["ioulab.git_commit"])
        assert len(children) == smoke_trials() and all(c.info.status == "FINISHED" for c in children)
        assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    finally:
        head.stop()
    assert (user_token.read_bytes() if user_token.exists() else None) == before  # the user's token untouched
