"""MLflow tracking that never kills training and loses nothing.

:class:`MlflowRun` implements the detector's ``RunLogger`` protocol over ``MlflowClient`` (explicit
run ids, no global fluent state: Ray trials and the driver share processes' globals otherwise).
Every call goes into an in-memory queue first; the queue is flushed whenever the server answers.
While the tracking server is unreachable, calls fail fast (short HTTP timeout, few retries), a
warning is printed once, and the queue keeps growing; it is replayed when the server is back, or at
``close()``. What still cannot be delivered at ``close()`` is written to a JSON-lines file next to
the run's outputs, with the command that replays it (``replay_file``).

Runs can be found again by a tag (``find_tag``): a retried or restored Ray trial re-attaches to its
own child run instead of creating a duplicate.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

# Fail fast instead of MLflow's default ~4 minutes of retries per call; we retry ourselves.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")

from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

PARENT_TAG = "mlflow.parentRunId"  # MLflow's own nesting tag: works across processes
MAX_PARAM_LEN = 6000


def default_tracking_uri(cwd: str | os.PathLike | None = None) -> str:
    """``$MLFLOW_TRACKING_URI``, else an SQLite file in the working directory, as an absolute URI
    (Ray trials change their working directory: a relative URI would point elsewhere)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return absolute_uri(env)
    return f"sqlite:///{(Path(cwd or os.getcwd()) / 'mlflow.db').resolve()}"


def absolute_uri(uri: str) -> str:
    """Make ``sqlite:///relative.db`` and bare paths absolute; leave server URIs alone."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    if "://" not in uri:
        return Path(uri).resolve().as_uri()
    return uri


def _clean_params(params: dict[str, Any]) -> dict[str, str]:
    return {k: str(v)[:MAX_PARAM_LEN] for k, v in params.items()}


class MlflowRun:
    """One MLflow run (created, or found again by ``find_tag``), with buffered, replayable logging.

    Args:
        tracking_uri: MLflow tracking URI (absolute).
        experiment: experiment name (created if missing).
        run_name: display name for a new run.
        tags: tags set on the run.
        find_tag: ``(key, value)``: reuse the newest run of the experiment carrying this tag.
        spool: JSON-lines file for whatever cannot be delivered by ``close()``.
        run_id: attach to this existing run instead.
    """

    def __init__(self, tracking_uri: str, experiment: str, run_name: str | None = None,
                 tags: dict[str, str] | None = None, find_tag: tuple[str, str] | None = None,
                 spool: str | os.PathLike | None = None, retry_seconds: float = 15.0,
                 run_id: str | None = None):
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        self.experiment = experiment
        self.run_name = run_name
        self.tags = dict(tags or {})
        if find_tag:
            self.tags[find_tag[0]] = find_tag[1]
        self.find_tag = find_tag
        self.spool = Path(spool) if spool else None
        self.retry_seconds = retry_seconds
        self.run_id: str | None = run_id
        self._queue: list[tuple[str, Any]] = []
        self._warned = False
        self._next_try = 0.0
        self._flush(force=True)

    # -- RunLogger protocol --------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        self._queue.append(("params", _clean_params(params)))
        self._flush()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        self._queue.append(("metrics", {"values": clean, "step": int(step), "timestamp": now}))
        self._flush()

    def log_artifact(self, path: Path) -> None:
        self._queue.append(("artifact", str(Path(path).resolve())))
        self._flush()

    # -- extras ----------------------------------------------------------------------------------
    def set_tags(self, tags: dict[str, str]) -> None:
        self._queue.append(("tags", {k: str(v) for k, v in tags.items()}))
        self._flush()

    def close(self, status: str = "FINISHED") -> bool:
        """Deliver everything (one last try), end the run. Returns True if nothing was lost;
        otherwise the rest is written to the spool file and a warning says how to replay it."""
        self._queue.append(("end", status))
        self._flush(force=True)
        if not self._queue:
            return True
        if self.spool is not None:
            self.spool.parent.mkdir(parents=True, exist_ok=True)
            with self.spool.open("a") as f:
                header = {"tracking_uri": self.tracking_uri, "experiment": self.experiment,
                          "run_id": self.run_id, "run_name": self.run_name, "tags": self.tags}
                f.write(json.dumps({"header": header}) + "\n")
                for kind, payload in self._queue:
                    f.write(json.dumps({"kind": kind, "payload": payload}) + "\n")
            print(f"[ioulab] MLflow at {self.tracking_uri} unreachable: {len(self._queue)} pending "
                  f"records saved to {self.spool}; replay with `python -m ioulab.platform.tracking "
                  f"{self.spool}`", file=sys.stderr)
        return False

    @property
    def pending(self) -> int:
        return len(self._queue)

    # -- delivery --------------------------------------------------------------------------------
    def _ensure_run(self) -> None:
        if self.run_id is not None:
            return
        exp = self.client.get_experiment_by_name(self.experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(self.experiment)
        if self.find_tag:
            key, value = self.find_tag
            found = self.client.search_runs([exp_id], filter_string=f"tags.`{key}` = '{value}'",
                                            order_by=["attributes.start_time DESC"], max_results=1)
            if found:
                self.run_id = found[0].info.run_id
                if found[0].info.status != "RUNNING":
                    self.client.update_run(self.run_id, status="RUNNING")
                return
        run = self.client.create_run(exp_id, run_name=self.run_name, tags=self.tags)
        self.run_id = run.info.run_id

    def _send(self, kind: str, payload: Any) -> None:
        c, run_id = self.client, self.run_id
        if kind == "params":
            existing = c.get_run(run_id).data.params
            # A restored trial logs its params again: MLflow refuses to change a param, so send
            # only new ones (and equal values are skipped).
            new = [Param(k, v) for k, v in payload.items() if k not in existing]
            for i in range(0, len(new), 100):
                c.log_batch(run_id, params=new[i:i + 100])
        elif kind == "metrics":
            ms = [Metric(k, v, payload["timestamp"], payload["step"]) for k, v in payload["values"].items()]
            for i in range(0, len(ms), 500):
                c.log_batch(run_id, metrics=ms[i:i + 500])
        elif kind == "tags":
            c.log_batch(run_id, tags=[RunTag(k, v) for k, v in payload.items()])
        elif kind == "artifact":
            if Path(payload).exists():
                c.log_artifact(run_id, payload)
        elif kind == "end":
            c.set_terminated(run_id, status=payload)

    def _flush(self, force: bool = False) -> None:
        if not force and time.monotonic() < self._next_try:
            return
        try:
            self._ensure_run()
            while self._queue:
                self._send(*self._queue[0])
                self._queue.pop(0)
            if self._warned:
                print(f"[ioulab] MLflow at {self.tracking_uri} reachable again: backlog delivered",
                      file=sys.stderr)
                self._warned = False
        except Exception as exc:  # network, server 5xx, DB locked: never kill training
            self._next_try = time.monotonic() + self.retry_seconds
            if not self._warned:
                print(f"[ioulab] warning: MLflow at {self.tracking_uri} failed ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); training continues, "
                      "metrics are kept and sent when it is back", file=sys.stderr)
                self._warned = True


def replay_file(path: str | os.PathLike) -> int:
    """Deliver the records of a spool file written by :meth:`MlflowRun.close`."""
    lines = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    remaining = 0
    run: MlflowRun | None = None
    runs: list[MlflowRun] = []
    for line in lines:
        if "header" in line:
            h = line["header"]
            runs.append(MlflowRun(h["tracking_uri"], h["experiment"], h["run_name"], h["tags"],
                                  run_id=h["run_id"]))
        elif runs:
            runs[-1]._queue.append((line["kind"], line["payload"]))
    for run in runs:
        run._flush(force=True)
    return sum(run.pending for run in runs)


def _main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m ioulab.platform.tracking SPOOL.jsonl", file=sys.stderr)
        return 2
    left = replay_file(argv[0])
    print("replayed" if left == 0 else f"{left} records still pending (server unreachable?)")
    return 0 if left == 0 else 1


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
