"""MLflow tracking that never kills training and loses nothing.

:class:`MlflowRun` implements the detector's ``RunLogger`` protocol over ``MlflowClient`` (explicit
run ids, no global fluent state: Ray trials and the driver share processes' globals otherwise).
Every call goes into an in-memory queue first; the queue is flushed whenever the server answers.
While the tracking server is unreachable, calls fail fast (short HTTP timeout, few retries), a
warning is printed once, and the queue keeps growing; it is replayed when the server is back, or at
``close()``. What still cannot be delivered at ``close()`` is written to a JSON-lines file next to
the run's outputs, with the command that replays it (``replay_file``).

Runs can be found again by tags (``find_tags``): a retried or restored Ray trial
re-attaches to its own child run instead of creating a duplicate. Logging into a re-attached run is
idempotent: a metric already recorded at a step is not sent again (a restored trial repeats steps),
params are sent once, tags and artifacts are overwritten with equal content.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

# Fail fast instead of MLflow's default ~4 minutes of retries per call: one attempt per request,
# bounded by MLFLOW_HTTP_REQUEST_TIMEOUT seconds (``--mlflow-timeout``); the queue retries later.
DEFAULT_TIMEOUT = 5
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(DEFAULT_TIMEOUT))
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")

from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from ioulab.detector.errors import UserError  # noqa: E402
# The naming contract; absolute_uri and default_tracking_uri are re-exported for callers of this module.
from ioulab.platform.mlflow_names import (absolute_uri, default_tracking_uri, experiment_tags,  # noqa: E402,F401
                                          has_tags, resolve_tracking_uri, tag_filter)

MAX_PARAM_LEN = 6000
# Error codes for a record the server will never accept (as opposed to an outage).
PERMANENT_ERRORS = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE"}
RECORD_KINDS = {"params", "metrics", "tags", "artifact", "end"}
# A server with authentication refusing this process's credentials: a setup error, not an outage.
AUTH_ERRORS = {"UNAUTHENTICATED", "PERMISSION_DENIED"}


class SpoolError(UserError, ValueError):
    """A spool file that is refused (another tracking server, files outside its folder, bad JSON)."""


class TrackingAuthError(UserError):
    """The tracking server refused the credentials (MLFLOW_TRACKING_USERNAME / _PASSWORD)."""


def set_request_timeout(seconds: int) -> None:
    """Bound every MLflow HTTP request of this process (and of the processes it starts) to
    ``seconds``, with no client-side retry: a tracking server that accepts connections but never
    answers then blocks training for at most ``seconds`` per delivery attempt."""
    if int(seconds) < 1:
        raise ValueError(f"MLflow request timeout must be >= 1 s, got {seconds}")
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(seconds))
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created with :func:`experiment_tags` when missing; an
    existing experiment without them gets them (the MLflow UI then opens on its runs table)."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name, tags=experiment_tags())
    for key, value in experiment_tags().items():
        if key not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


def _clean_params(params: dict[str, Any]) -> dict[str, str]:
    return {k: str(v)[:MAX_PARAM_LEN] for k, v in params.items()}


class MlflowRun:
    """One MLflow run (created, or found again by ``find_tags``), with buffered, replayable logging.

    Args:
        tracking_uri: MLflow tracking URI (absolute).
        experiment: experiment name (created if missing).
        run_name: display name for a new run.
        tags: tags set on the run.
        find_tags: ``{key: value, ...}``: reuse the newest run of the experiment carrying all
            these tags (they are set on a new run too).
        spool: JSON-lines file for whatever cannot be delivered by ``close()``.
        run_id: attach to this existing run instead.
        connect: try to reach the server now (otherwise at the first logging call); a server
            that refuses the credentials raises :class:`TrackingAuthError` then.
    """

    def __init__(self, tracking_uri: str, experiment: str, run_name: str | None = None,
                 tags: dict[str, str] | None = None,
                 spool: str | os.PathLike | None = None, retry_seconds: float = 15.0,
                 run_id: str | None = None, find_tags: dict[str, str] | None = None,
                 connect: bool = True):
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        self.experiment = experiment
        self.run_name = run_name
        self.tags = dict(tags or {})
        self.find_tags = dict(find_tags or {})
        self.tags.update(self.find_tags)
        self.spool = Path(spool) if spool else None
        self.retry_seconds = retry_seconds
        self.run_id: str | None = run_id
        self.reattached = False  # True when the run was found again by its tags
        self._queue: list[tuple[str, Any]] = []
        # (key -> steps) already in the run; None until known. Only re-attached runs can hold
        # metrics this object did not send; new runs start empty.
        self._logged_steps: dict[str, set[int]] | None = None
        self._warned = False
        self._next_try = 0.0
        self._failures = 0  # consecutive failed attempts: the retry interval doubles up to max_retry_seconds
        self.max_retry_seconds = max(retry_seconds, 120.0)
        if connect:
            self._flush(force=True, raise_auth=True)

    # -- RunLogger protocol --------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        self._queue.append(("params", _clean_params(params)))
        self._flush()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        self._queue.append(("metrics", {"values": clean, "step": int(step), "timestamp": now}))
        self._flush()

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        record = str(Path(path).resolve())
        self._queue.append(("artifact", record if artifact_path is None else [record, artifact_path]))
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
            records = self._spooled_records()
            with self.spool.open("a") as f:
                header = {"tracking_uri": self.tracking_uri, "experiment": self.experiment,
                          "run_id": self.run_id, "run_name": self.run_name, "tags": self.tags,
                          "find_tags": self.find_tags}
                f.write(json.dumps({"header": header}) + "\n")
                for kind, payload in records:
                    f.write(json.dumps({"kind": kind, "payload": payload}) + "\n")
            print(f"[ioulab] MLflow at {self.tracking_uri} unreachable: {len(self._queue)} pending "
                  f"records saved to {self.spool}; replay with `python -m ioulab.platform.tracking "
                  f"{self.spool} --tracking-uri {self.tracking_uri}`", file=sys.stderr)
        return False

    def _spooled_records(self) -> list[tuple[str, Any]]:
        """The queue as written to the spool: a file to upload that lies outside the spool's own
        folder (a Ray trial's working directory) is copied next to the spool first, because a
        replay uploads nothing from outside that folder (:func:`read_spool`)."""
        root, out = spool_root(self.spool), []
        for n, (kind, payload) in enumerate(self._queue):
            if kind == "artifact":
                local, artifact_path = payload if isinstance(payload, list) else (payload, None)
                src = Path(local)
                if src.is_file() and not src.resolve().is_relative_to(root):
                    copy = self.spool.parent / f"{self.spool.stem}.files" / str(n) / src.name
                    copy.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, copy)
                    payload = str(copy) if artifact_path is None else [str(copy), artifact_path]
            out.append((kind, payload))
        return out

    @property
    def pending(self) -> int:
        return len(self._queue)

    def pending_records(self) -> list[dict[str, Any]]:
        """What is not delivered yet, as JSON-able records (see :meth:`requeue`)."""
        return [{"kind": kind, "payload": payload} for kind, payload in self._queue]

    def requeue(self, records: list[dict[str, Any]]) -> None:
        """Put records saved by :meth:`pending_records` (e.g. in a checkpoint of a trial that
        died) in front of the queue; they are delivered idempotently."""
        self._queue[:0] = [(r["kind"], r["payload"]) for r in records if r["kind"] != "end"]
        self._flush()

    def deliver(self, timeout: float) -> bool:
        """Keep retrying for up to ``timeout`` seconds until the queue is empty."""
        deadline = time.monotonic() + timeout
        while True:
            self._flush(force=True)
            if not self._queue or time.monotonic() >= deadline:
                return not self._queue
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))

    # -- delivery --------------------------------------------------------------------------------
    def _ensure_run(self) -> None:
        if self.run_id is not None:
            return
        exp_id = ensure_experiment(self.client, self.experiment)
        if self.find_tags:
            run = self._find(exp_id)
            if run is not None:
                self._logged_steps = self._steps_in(run)
                self.run_id = run.info.run_id
                self.reattached = True
                if run.info.status != "RUNNING":
                    self.client.update_run(self.run_id, status="RUNNING")
                return
        run = self.client.create_run(exp_id, run_name=self.run_name, tags=self.tags)
        self.run_id = run.info.run_id
        self._logged_steps = {}

    def _find(self, exp_id: str):
        """The newest run of the experiment carrying ``find_tags`` exactly, or None."""
        where, token = tag_filter(self.find_tags), None
        while True:
            page = self.client.search_runs([exp_id], filter_string=where, max_results=100,
                                           order_by=["attributes.start_time DESC"], page_token=token)
            for run in page:
                if has_tags(run, self.find_tags):
                    return run
            token = page.token
            if not token:
                return None

    def _steps_in(self, run) -> dict[str, set[int]]:
        """metric key -> the steps the run already holds."""
        return {key: {m.step for m in self.client.get_metric_history(run.info.run_id, key)}
                for key in run.data.metrics}

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
            step = payload["step"]
            if self._logged_steps is None:  # attached by run_id: learn what the run holds
                self._logged_steps = self._steps_in(c.get_run(run_id))
            ms = [Metric(k, v, payload["timestamp"], step) for k, v in payload["values"].items()
                  if step not in self._logged_steps.get(k, ())]
            for i in range(0, len(ms), 500):
                c.log_batch(run_id, metrics=ms[i:i + 500])
            for m in ms:
                self._logged_steps.setdefault(m.key, set()).add(step)
        elif kind == "tags":
            c.log_batch(run_id, tags=[RunTag(k, v) for k, v in payload.items()])
        elif kind == "artifact":
            local, artifact_path = payload if isinstance(payload, list) else (payload, None)
            if Path(local).exists():
                c.log_artifact(run_id, local, artifact_path)
        elif kind == "end":
            c.set_terminated(run_id, status=payload)

    def _flush(self, force: bool = False, raise_auth: bool = False) -> None:
        if not force and time.monotonic() < self._next_try:
            return
        try:
            self._ensure_run()
            while self._queue:
                try:
                    self._send(*self._queue[0])
                except MlflowException as exc:
                    if exc.error_code not in PERMANENT_ERRORS:
                        raise
                    # The server refuses this record itself (not an outage): retrying cannot help.
                    print(f"[ioulab] warning: MLflow refused a {self._queue[0][0]} record of run "
                          f"{self.run_id}: {str(exc)[:300]}", file=sys.stderr)
                self._queue.pop(0)
            self._failures = 0
            if self._warned:
                print(f"[ioulab] MLflow at {self.tracking_uri} reachable again: backlog delivered",
                      file=sys.stderr)
                self._warned = False
        except Exception as exc:  # network, timeout, server 5xx, DB locked: never kill training
            if raise_auth and getattr(exc, "error_code", None) in AUTH_ERRORS:
                who = os.environ.get("MLFLOW_TRACKING_USERNAME")
                who = f"user {who!r}" if who else "a client without credentials"
                raise TrackingAuthError(
                    f"MLflow at {self.tracking_uri} refused {who} ({exc.error_code}): set "
                    "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (on a cluster: in the "
                    "environment of every node's `ray start`)") from None
            self._failures += 1
            delay = self.retry_seconds * 2 ** min(self._failures - 1, 16)
            self._next_try = time.monotonic() + min(delay, self.max_retry_seconds)
            if not self._warned:
                print(f"[ioulab] warning: MLflow at {self.tracking_uri} failed ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); training continues, "
                      "metrics are kept and sent when it is back", file=sys.stderr)
                self._warned = True


def spool_root(spool: str | os.PathLike) -> Path:
    """The folder a spool file may upload files from: its run folder (the folder holding it), or
    for ``<storage>/<sweep>/mlflow_spool/X.jsonl`` the sweep's folder. Resolved (no symlinks)."""
    folder = Path(os.path.abspath(spool)).parent.resolve()
    return folder.parent if folder.name == "mlflow_spool" else folder


def same_uri(a: str, b: str) -> bool:
    return absolute_uri(a).rstrip("/") == absolute_uri(b).rstrip("/")


def _checked_artifact(payload: Any, root: Path, where: str) -> Any:
    """The artifact record with its local path resolved; refused unless it is an absolute path to
    a file inside ``root`` once symlinks are resolved."""
    local, artifact_path = payload if isinstance(payload, list) and len(payload) == 2 else (payload, None)
    if not isinstance(local, str) or not os.path.isabs(local):
        raise SpoolError(f"{where}: artifact {local!r} is not an absolute path")
    resolved = Path(local).resolve()
    if not resolved.is_relative_to(root):
        raise SpoolError(f"{where}: artifact {local} is outside {root} (resolved: {resolved}); "
                         "a spool file uploads only files of its own run folder")
    if resolved.exists() and not resolved.is_file():
        raise SpoolError(f"{where}: artifact {local} is not a regular file")
    return str(resolved) if artifact_path is None else [str(resolved), artifact_path]


def read_spool(path: str | os.PathLike, tracking_uri: str, root: str | os.PathLike | None = None
               ) -> list[MlflowRun]:
    """The runs of a spool file, checked before anything is sent: every header must name
    ``tracking_uri`` (the current command's: a spool file never chooses the server), and every
    file to upload must lie inside ``root`` (default :func:`spool_root`). Raises SpoolError."""
    path = Path(path)
    root = Path(root).resolve() if root is not None else spool_root(path)
    runs: list[MlflowRun] = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SpoolError(f"cannot read spool file {path}: {exc}") from exc
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        where = f"{path}:{number}"
        try:
            line = json.loads(text)
        except ValueError as exc:
            raise SpoolError(f"{where}: not JSON ({exc})") from exc
        if not isinstance(line, dict):
            raise SpoolError(f"{where}: not a spool record")
        if "header" in line:
            h = line["header"]
            uri = h.get("tracking_uri") if isinstance(h, dict) else None
            if not isinstance(uri, str) or not same_uri(uri, tracking_uri):
                raise SpoolError(f"{where}: records for tracking URI {uri!r}, not {tracking_uri}; "
                                 f"replay it with --tracking-uri set to that server if you trust it")
            if not isinstance(h.get("experiment"), str) or not all(
                    h.get(k) is None or isinstance(h[k], dict) for k in ("tags", "find_tags")):
                raise SpoolError(f"{where}: malformed spool header")
            runs.append(MlflowRun(tracking_uri, h["experiment"], h.get("run_name"), h.get("tags"),
                                  run_id=h.get("run_id"), find_tags=h.get("find_tags"), connect=False))
        elif line.get("kind") in RECORD_KINDS and runs:
            payload = line.get("payload")
            if line["kind"] == "artifact":
                payload = _checked_artifact(payload, root, where)
            runs[-1]._queue.append((line["kind"], payload))
        else:
            raise SpoolError(f"{where}: not a spool record (kind {line.get('kind')!r})")
    return runs


def replay_file(path: str | os.PathLike, tracking_uri: str, root: str | os.PathLike | None = None) -> int:
    """Deliver the records of a spool file written by :meth:`MlflowRun.close` to ``tracking_uri``
    (see :func:`read_spool` for what is refused). Returns the number of records still pending."""
    runs = read_spool(path, tracking_uri, root)
    for run in runs:
        run._flush(force=True)
    return sum(run.pending for run in runs)


def _main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m ioulab.platform.tracking",
                                description="Replay an MLflow spool file (records a run could not deliver).")
    p.add_argument("spool", help="a mlflow_pending.jsonl or <sweep>/mlflow_spool/*.jsonl file")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI the records go to; must be the one the file was written "
                        "for (default: $MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db)")
    args = p.parse_args(argv)
    uri = resolve_tracking_uri(args.tracking_uri)
    try:
        left = replay_file(args.spool, uri)
    except SpoolError as exc:
        print(f"ioulab: error: {exc}", file=sys.stderr)
        return 2
    print("replayed" if left == 0 else f"{left} records still pending (server unreachable?)")
    return 0 if left == 0 else 1


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
