"""A view of the MLflow UI's runs table for each sweep: its runs only, the parent expandable to its
trials, with the varying config keys and AP … AP90 as visible columns.

MLflow 3.17's runs table shows only a few attributes by default and keeps the chosen columns in
the browser, so a tag cannot make columns visible for everyone. What the UI does offer is its
"Share" view: a JSON of the search and column state stored as an experiment tag
``mlflow.sharedViewState.<key>``, opened with ``#/experiments/<id>/runs?viewStateShareKey=<key>``
(the UI's ``getExperimentPageRoute``; ``workflowType=machine_learning`` selects the runs table
over the GenAI overview, see README). ioulab writes one such view per sweep name and prints its
link; the state keys are the UI's own (``searchFilter``, ``orderByKey``, ... and
``selectedColumns`` with column ids ``params.`<key>``` / ``metrics.`<key>```).
``tests/platform/test_mlflow_ui.py`` opens the link in headless Chromium.
"""
from __future__ import annotations

import json
import re
import sys

from ioulab.platform import mlflow_names

# The sweep's summary metrics (sweep/driver.py SUMMARY_METRICS), as columns
COLUMN_METRICS = ("AP", "AP50", "AP60", "AP70", "AP75", "AP80", "AP90")
DEFAULT_UI = "http://127.0.0.1:5000/"   # where `mlflow ui` serves a local store


def view_key(sweep: str) -> str:
    """The share key of ``sweep``'s view (URL- and tag-safe; the same sweep name, the same view)."""
    return "ioulab-" + re.sub(r"[^A-Za-z0-9_-]+", "-", sweep).strip("-")


def view_state(sweep: str, varying_keys, metrics=COLUMN_METRICS) -> dict:
    """The UI state: runs of ``sweep`` (its parent and trials), newest first, with the
    ``varying_keys`` (params) and ``metrics`` as columns."""
    return {"searchFilter": f"tags.`{mlflow_names.SWEEP}` = '{sweep}'",
            "orderByKey": "attributes.start_time", "orderByAsc": False, "startTime": "ALL",
            "lifecycleFilter": "Active", "datasetsFilter": [], "modelVersionFilter": "All Runs",
            "selectedColumns": [f"params.`{k}`" for k in varying_keys] + [f"metrics.`{m}`" for m in metrics]}


def view_path(experiment_id: str, key: str) -> str:
    """The UI route of a saved view (after the server's base URL)."""
    return f"#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={key}"


def view_url(tracking_uri: str, experiment_id: str, key: str) -> str:
    """The link to print: on the tracking server itself, else where `mlflow ui` serves the store."""
    base = tracking_uri if tracking_uri.startswith(("http://", "https://")) else DEFAULT_UI
    return base.rstrip("/") + "/" + view_path(experiment_id, key)


def save_view(client, experiment_id: str, sweep: str, varying_keys, metrics=COLUMN_METRICS) -> str:
    """Write ``sweep``'s view as an experiment tag; returns its key."""
    key = view_key(sweep)
    client.set_experiment_tag(experiment_id, mlflow_names.SHARED_VIEW_PREFIX + key,
                              json.dumps(view_state(sweep, varying_keys, metrics)))
    return key


def save_sweep_view(tracking_uri: str, experiment: str, sweep: str, varying_keys) -> str | None:
    """:func:`save_view` at the end of a sweep; returns the link to print, or None (with a
    warning) when MLflow cannot take it: the view is a convenience, the sweep's results are
    already logged."""
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return None
        return view_url(tracking_uri, exp.experiment_id, save_view(client, exp.experiment_id, sweep, varying_keys))
    except Exception as exc:  # an unreachable or read-only store: no view, say why
        print(f"[ioulab] warning: MLflow UI view of sweep {sweep} not saved ({type(exc).__name__}: {exc})",
              file=sys.stderr)
        return None


def saved_view_url(client, experiment_id: str, sweep: str) -> str | None:
    """The link of ``sweep``'s view when the experiment has one (for the report), else None."""
    key = view_key(sweep)
    tags = client.get_experiment(experiment_id).tags
    return view_url(client.tracking_uri, experiment_id, key) if mlflow_names.SHARED_VIEW_PREFIX + key in tags else None
