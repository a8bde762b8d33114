"""MLflow outages never kill training and lose nothing."""
import json
import socket

from mlflow.tracking import MlflowClient

from ioulab.platform.tracking import MlflowRun, absolute_uri, replay_file


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_spools_and_replays(tmp_path):
    dead = f"http://127.0.0.1:{_free_port()}"
    spool = tmp_path / "pending.jsonl"
    run = MlflowRun(dead, "exp", run_name="r", tags={"k": "v"}, spool=spool, retry_seconds=0)
    run.log_params({"a": 1})
    for step in range(3):
        run.log_metrics({"loss/total": 1.0 / (step + 1)}, step)
    (tmp_path / "m.json").write_text("{}")
    run.log_artifact(tmp_path / "m.json")
    assert run.close() is False and run.pending > 0
    lines = [json.loads(x) for x in spool.read_text().splitlines()]
    assert lines[0]["header"]["tracking_uri"] == dead
    # The records point at the dead server; replay them into a live store instead.
    live = f"sqlite:///{tmp_path / 'live.db'}"
    lines[0]["header"]["tracking_uri"] = live
    spool.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert replay_file(spool) == 0
    client = MlflowClient(live)
    (r,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert r.data.params == {"a": "1"} and r.data.tags["k"] == "v"
    assert [m.value for m in client.get_metric_history(r.info.run_id, "loss/total")] == [1.0, 0.5, 1 / 3]
    assert r.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(r.info.run_id)] == ["m.json"]


def test_find_tag_reattaches_instead_of_duplicating(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    first = MlflowRun(uri, "exp", run_name="trial", find_tag=("ray.trial_id", "t1"))
    first.log_params({"x": 1})
    first.log_metrics({"AP": 1.0}, 0)
    first.close("FAILED")
    again = MlflowRun(uri, "exp", run_name="trial", find_tag=("ray.trial_id", "t1"))
    again.log_params({"x": 1, "y": 2})  # re-logging an equal param is fine
    again.log_metrics({"AP": 2.0}, 1)
    again.close()
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == first.run_id == again.run_id
    assert runs[0].info.status == "FINISHED" and runs[0].data.params == {"x": "1", "y": "2"}


def test_absolute_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert absolute_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
