"""The MLflow UI as users meet it: `mlflow server` on 127.0.0.1 over a small sweep's store, opened
in headless Chromium (driven over the DevTools protocol on a pipe: no extra package). The
``ioulab`` experiment opens on the runs table, the sweep's parent run is there and expands to its
trials; the sweep's saved view (platform/ui_view.py) shows its varying key and AP as columns,
which the default table does not. The screenshots are kept in the tests' tmp_path (paths printed).

MLflow 3.17's UI has a global GenAI / Model-training switch (browser storage, GenAI by default)
that wins over the experiment's ``mlflow.experimentKind`` tag; the ``workflowType=machine_learning``
URL parameter selects the runs table, as the README's link does.
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from mlflow.tracking import MlflowClient

from ioulab.platform import mlflow_names, tracking, ui_view

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SWEEP, TRIALS = "ablation-cpu", ("eval-000 mode=baseline", "eval-001 mode=iou_nms")

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240),
              pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed: MLflow UI test skipped")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _store(uri: str) -> str:
    """A sweep's parent run and two trials nested under it; returns the experiment id."""
    client = MlflowClient(uri)
    exp = tracking.ensure_experiment(client, "ioulab")
    parent = client.create_run(exp, run_name=f"{SWEEP}-sweep", tags={mlflow_names.ROLE: mlflow_names.ROLE_SWEEP,
                                                                   mlflow_names.SWEEP: SWEEP})
    for i, name in enumerate(TRIALS):
        run = client.create_run(exp, run_name=name, tags=mlflow_names.trial_tags(
            SWEEP, "eval", label=name.split()[1], index=i, parent_run_id=parent.info.run_id))
        client.log_param(run.info.run_id, "inference.mode", name.split("=")[1])
        client.log_metric(run.info.run_id, "AP", 30.0 + i)
        client.set_terminated(run.info.run_id)
    client.set_terminated(parent.info.run_id)
    ui_view.save_view(client, exp, SWEEP, ["inference.mode"])
    return exp


class _Chromium:
    """Headless Chromium driven over ``--remote-debugging-pipe`` (fd 3 in, fd 4 out, NUL-separated
    JSON messages of the DevTools protocol)."""

    def __init__(self, profile):
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()

        def fds():   # in the child: the pipe ends become fds 3 and 4 (moved above 9 first: no clobbering)
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_chrome_r, from_chrome_w)]
            for fd, target in zip(high, (3, 4)):
                os.dup2(fd, target)

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
             "--disable-background-networking", "--disable-component-update", "--remote-debugging-pipe",
             f"--user-data-dir={profile}", "--window-size=1600,1000", "about:blank"],
            pass_fds=(3, 4), preexec_fn=fds, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf, self._id = b"", 0

    def send(self, method: str, session: str | None = None, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self._buf:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (RuntimeError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._w)
        os.close(self._r)


def _wait_text(chrome: _Chromium, session: str, needles, seconds: float = 60.0) -> str:
    deadline = time.monotonic() + seconds
    text = ""
    while time.monotonic() < deadline:
        text = chrome.send("Runtime.evaluate", session, expression="document.body ? document.body.innerText : ''",
                           returnByValue=True)["result"].get("value", "")
        if all(n in text for n in needles):
            return text
        time.sleep(1.0)
    raise AssertionError(f"not on the page after {seconds:.0f} s: {needles}; page text: {text[:1500]!r}")


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """(base URL, experiment id, Chromium, tmp folder): `mlflow server` over the store, one browser."""
    tmp = tmp_path_factory.mktemp("mlflow_ui")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    exp = _store(uri)
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
                               "--default-artifact-root", (tmp / "artifacts").as_uri(),
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=open(tmp / "server.log", "w"))
    chrome = None
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise AssertionError((tmp / "server.log").read_text()[-2000:])
                time.sleep(1.0)
        chrome = _Chromium(tmp / "profile")
        yield f"http://127.0.0.1:{port}/", exp, chrome, tmp
    finally:
        if chrome is not None:
            chrome.close()
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()


def _open(chrome: _Chromium, url: str) -> str:
    target = chrome.send("Target.createTarget", url=url)["targetId"]
    return chrome.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]


def _expand_parent(chrome: _Chromium, session: str) -> None:
    clicked = chrome.send("Runtime.evaluate", session, returnByValue=True, expression=(
        "(() => { const b = document.querySelector('button[data-component-id*=\"runnamecellrenderer\"]');"
        " if (b) b.click(); return !!b; })()"))["result"]["value"]
    assert clicked, "no expander next to the parent run"


def _screenshot(chrome: _Chromium, session: str, path) -> None:
    path.write_bytes(base64.b64decode(chrome.send("Page.captureScreenshot", session, format="png")["data"]))
    assert path.stat().st_size > 20_000
    print(f"MLflow UI screenshot: {path}")


def test_runs_page_shows_the_sweep_parent_and_its_trials(ui):
    base, exp, chrome, tmp = ui
    assert MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}").get_experiment(exp).tags[mlflow_names.EXPERIMENT_KIND] \
        == "custom_model_development"
    session = _open(chrome, f"{base}#/experiments/{exp}/runs?workflowType=machine_learning")
    text = _wait_text(chrome, session, [f"{SWEEP}-sweep", "matching runs"])
    assert "Token Usage" not in text          # the runs table, not the GenAI overview
    assert "3 matching runs" in " ".join(text.split())   # the parent and its two trials
    assert "inference.mode" not in text       # the default columns: why the sweep saves a view
    _expand_parent(chrome, session)           # the trials are nested under the parent
    _wait_text(chrome, session, TRIALS, seconds=30)
    _screenshot(chrome, session, tmp / "mlflow_runs_page.png")


def test_the_sweeps_view_shows_its_varying_key_and_ap_columns(ui):
    base, exp, chrome, tmp = ui
    session = _open(chrome, base + ui_view.view_path(exp, ui_view.view_key(SWEEP)))
    text = _wait_text(chrome, session, [f"{SWEEP}-sweep", "shared view", "inference.mode", "AP"])
    assert "3 matching runs" in " ".join(text.split())
    _expand_parent(chrome, session)
    cells = _wait_text(chrome, session, [*TRIALS, "baseline", "iou_nms"], seconds=30).split("\n")
    assert "30" in cells and "31" in cells     # the trials' AP in its column
    _screenshot(chrome, session, tmp / "mlflow_sweep_view.png")
