"""The per-sweep view of the MLflow UI's runs table (platform/ui_view.py): the state the UI's
"Share" button would write, saved as an experiment tag, its link printed by the sweep and shown
in the report. tests/platform/test_mlflow_ui.py opens it in headless Chromium."""
from __future__ import annotations

import json

import mlflow.tracking

from ioulab.platform import mlflow_names, ui_view
from tests.platform.report.store import SweepStore

MODE = "inference.mode"


def test_view_state_filters_the_sweep_and_shows_its_keys_and_aps():
    state = ui_view.view_state("ablation-cpu", [MODE, "inference.refine.lam"])
    assert state["searchFilter"] == "tags.`ioulab.sweep` = 'ablation-cpu'"
    assert state["selectedColumns"] == ["params.`inference.mode`", "params.`inference.refine.lam`",
                                        *(f"metrics.`{m}`" for m in ("AP", "AP50", "AP60", "AP70", "AP75", "AP80", "AP90"))]
    assert ui_view.view_key("my sweep/v2") == "ioulab-my-sweep-v2"
    assert ui_view.view_url("sqlite:////tmp/m.db", "3", "ioulab-a") == \
        "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning&viewStateShareKey=ioulab-a"
    assert ui_view.view_url("http://mlflow.lab:5000/", "3", "k").startswith("http://mlflow.lab:5000/#/experiments/3/runs?")


def test_saved_view_is_an_experiment_tag_and_the_report_links_it(tmp_path):
    from ioulab.platform.report.command import build_report

    st = SweepStore(tmp_path)
    parent = st.parent("where", [MODE], {MODE: "baseline"})
    for i, mode in enumerate(("baseline", "refine")):
        st.trial(parent, "where", f"t{i}", {MODE: mode}, {"AP": 30.0 + i}, stage="eval")
    report, _ = build_report(st.client, "where", resamples=0)
    assert "MLflow UI view" not in dict(report.meta)      # none saved yet
    exp = st.client.get_experiment(st.exp).name
    url = ui_view.save_sweep_view(st.uri, exp, "where", [MODE])
    assert url.endswith(f"#/experiments/{st.exp}/runs?workflowType=machine_learning&viewStateShareKey=ioulab-where")
    tags = st.client.get_experiment(st.exp).tags
    assert json.loads(tags[mlflow_names.SHARED_VIEW_PREFIX + "ioulab-where"]) == ui_view.view_state("where", [MODE])
    report, _ = build_report(st.client, "where", resamples=0)
    assert dict(report.meta)["MLflow UI view"] == url
    assert ui_view.save_sweep_view(st.uri, "no-such-experiment", "where", [MODE]) is None


def test_a_store_that_refuses_the_view_warns_and_the_sweep_goes_on(monkeypatch, capsys):
    class Refusing:
        def __init__(self, uri):
            raise PermissionError("read-only store")

    monkeypatch.setattr(mlflow.tracking, "MlflowClient", Refusing)
    assert ui_view.save_sweep_view("sqlite:////tmp/x.db", "ioulab", "abl", [MODE]) is None
    assert "MLflow UI view of sweep abl not saved (PermissionError: read-only store)" in capsys.readouterr().err
