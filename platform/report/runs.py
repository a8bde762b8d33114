"""Read sweeps and runs back from MLflow, following the naming contract the sweep writes
(:mod:`ioulab.platform.mlflow_names`).

Parent run per sweep: tags ``ioulab.role=sweep``, ``ioulab.sweep=<name>``, ``ioulab.varying_keys``
(JSON list), ``ioulab.baseline`` (JSON dict), ``ioulab.space_file``, ``ioulab.git_commit``,
``ioulab.paper`` (JSON: the space file's ``paper:`` block, when it has one; see :mod:`.paper`).
Child run per trial: tags ``mlflow.parentRunId``, ``ioulab.role=trial``, ``ray.trial_id``,
``ioulab.stage`` (train|eval), ``ioulab.trial_status``, eval trials ``ioulab.train_run_id``;
params = the flattened config (dotted keys), metrics ``AP``, ``AP50``, ... and ``loss/<name>``.

Only :class:`MlflowClient` with explicit run ids; no Ray, no global fluent state.
"""
from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ioulab.detector.errors import UserError
from ioulab.platform import mlflow_names

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
# MLflow run status -> trial status, for runs that lack the ``ioulab.trial_status`` tag.
_STATUS_FROM_RUN = {"FINISHED": "FINISHED", "FAILED": "FAILED", "KILLED": "STOPPED"}


class ReportError(UserError):
    """A user-facing error (unknown sweep or run, bad --baseline): printed, exit code 2."""


@dataclass
class Trial:
    """One MLflow run as the report sees it (a sweep's trial, or any run for ``compare``)."""

    run_id: str
    name: str                    # ray.trial_id, else the MLflow run name
    status: str                  # FINISHED | FAILED | STOPPED | RUNNING ...
    run_status: str              # MLflow's own status
    stage: str                   # train | eval
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    start_time: int = 0

    @property
    def train_run_id(self) -> str | None:
        return self.tags.get(mlflow_names.TRAIN_RUN_ID)

    @classmethod
    def from_run(cls, run) -> "Trial":
        tags = dict(run.data.tags)
        status = tags.get(mlflow_names.TRIAL_STATUS) or _STATUS_FROM_RUN.get(run.info.status, run.info.status)
        return cls(run_id=run.info.run_id,
                   name=tags.get(mlflow_names.TRIAL_ID) or run.info.run_name or run.info.run_id[:8],
                   status=status, run_status=run.info.status,
                   stage=tags.get(mlflow_names.STAGE, mlflow_names.DEFAULT_STAGE),
                   params=dict(run.data.params), metrics=dict(run.data.metrics), tags=tags,
                   start_time=run.info.start_time or 0)


@dataclass
class Sweep:
    """A sweep's parent run and its trials."""

    name: str
    parent_id: str
    tags: dict[str, str]
    trials: list[Trial]
    varying_keys: list[str] = field(default_factory=list)
    baseline: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _all_experiment_ids(client: MlflowClient) -> list[str]:
    ids, token = [], None
    while True:
        page = client.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
        ids += [e.experiment_id for e in page]
        token = page.token
        if not token:
            return ids


def search_all(client: MlflowClient, filter_string: str, order_by: list[str] | None = None) -> list:
    """Every active run of every active experiment that matches ``filter_string`` (all pages)."""
    exp_ids = _all_experiment_ids(client)
    runs, token = [], None
    if not exp_ids:
        return runs
    while True:
        page = client.search_runs(exp_ids, filter_string=filter_string, max_results=1000,
                                  order_by=order_by or ["attributes.start_time DESC"], page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def known_sweeps(client: MlflowClient) -> list[tuple[str, str]]:
    """``[(sweep name, parent run id), ...]``, newest first."""
    parents = search_all(client, mlflow_names.tag_filter({mlflow_names.ROLE: mlflow_names.ROLE_SWEEP}))
    return [(r.data.tags.get(mlflow_names.SWEEP, r.info.run_name or "?"), r.info.run_id) for r in parents]


def _known_text(client: MlflowClient) -> str:
    sweeps = known_sweeps(client)
    if not sweeps:
        return f"no sweeps in {client.tracking_uri} (run `ioulab sweep SPACE.yaml` first)"
    listing = "\n".join(f"  {name}  (parent run {rid})" for name, rid in sweeps)
    return f"known sweeps in {client.tracking_uri}:\n{listing}"


def _get_run(client: MlflowClient, run_id: str):
    """The run, or None when the store says there is no such run (other errors propagate)."""
    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def find_parent(client: MlflowClient, sweep: str) -> tuple[Any, list[str]]:
    """The parent run of ``sweep`` (a sweep name or a parent run id) and notes about the choice.

    A name used by several sweeps (a sweep run again) picks the newest and notes the others."""
    if RUN_ID.match(sweep):
        run = _get_run(client, sweep)
        if run is not None:
            role = run.data.tags.get(mlflow_names.ROLE)
            if role != mlflow_names.ROLE_SWEEP:
                raise ReportError(f"run {sweep} is not a sweep's parent run ({mlflow_names.ROLE}={role}); "
                                  f"`ioulab compare RUN_ID ...` tables any runs; {_known_text(client)}")
            return run, []
    safe = sweep.replace("'", "\\'")
    role = mlflow_names.tag_filter({mlflow_names.ROLE: mlflow_names.ROLE_SWEEP})
    found = search_all(client, f"{role} and tags.`{mlflow_names.SWEEP}` = '{safe}'")
    if not found:
        raise ReportError(f"unknown sweep or run {sweep!r}; {_known_text(client)}")
    notes = []
    if len(found) > 1:
        older = ", ".join(r.info.run_id for r in found[1:])
        notes.append(f"{len(found)} sweeps are named {sweep!r}: reporting the newest "
                     f"({found[0].info.run_id}); older parent runs: {older}")
    return found[0], notes


def _dedupe_trials(trials: list[Trial]) -> list[Trial]:
    """One run per Ray trial id (the newest), in case a restore created a duplicate."""
    newest: dict[str, Trial] = {}
    for t in trials:
        key = t.tags.get(mlflow_names.TRIAL_ID) or t.run_id
        if key not in newest or t.start_time > newest[key].start_time:
            newest[key] = t
    return sorted(newest.values(), key=lambda t: (t.start_time, t.name))


def load_sweep(client: MlflowClient, sweep: str) -> Sweep:
    """Resolve ``sweep`` and read its child runs."""
    parent, notes = find_parent(client, sweep)
    children = search_all(client, mlflow_names.tag_filter({mlflow_names.PARENT: parent.info.run_id}))
    trials = _dedupe_trials([Trial.from_run(r) for r in children])
    tags = dict(parent.data.tags)
    return Sweep(name=tags.get(mlflow_names.SWEEP) or parent.info.run_name or parent.info.run_id,
                 parent_id=parent.info.run_id, tags=tags, trials=trials,
                 varying_keys=_json_tag(tags, mlflow_names.VARYING_KEYS, list),
                 baseline=_json_tag(tags, mlflow_names.BASELINE, dict), notes=notes)


def _json_tag(tags: dict[str, str], key: str, kind: type):
    raw = tags.get(key)
    if not raw:
        return kind()
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return kind()
    return value if isinstance(value, kind) else kind()


def load_runs(client: MlflowClient, run_ids: list[str]) -> list[Trial]:
    """The given runs, in the given order; an unknown id raises :class:`ReportError`."""
    trials = []
    for rid in run_ids:
        run = _get_run(client, rid)
        if run is None:
            raise ReportError(f"unknown run id {rid!r} in {client.tracking_uri}")
        trials.append(Trial.from_run(run))
    return trials


def parent_latency(client: MlflowClient, parent_id: str) -> dict | None:
    """The parent run's ``latency.json`` artifact (written by ``ioulab bench latency``), if any."""
    try:
        names = {a.path for a in client.list_artifacts(parent_id)}
    except Exception:  # artifact store unreachable: the report goes on without the table
        return None
    if "latency.json" not in names:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(parent_id, "latency.json", tmp)
        return json.loads(Path(path).read_text())
