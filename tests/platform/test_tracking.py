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
    first = MlflowRun(uri, "exp", run_name="trial", find_tags={"ray.trial_id": "t1"})
    first.log_params({"x": 1})
    first.log_metrics({"AP": 1.0}, 0)
    first.close("FAILED")
    again = MlflowRun(uri, "exp", run_name="trial", find_tags={"ray.trial_id": "t1"})
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


def test_reattached_run_logs_each_step_once(tmp_path):
    """A restored trial repeats steps: the re-attached run keeps the first value of each step."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    tags = {"ioulab.sweep_id": "s1", "ray.trial_id": "t1"}
    first = MlflowRun(uri, "exp", run_name="trial", find_tags=tags)
    for step in (1, 2, 3):
        first.log_metrics({"loss/total": float(step)}, step)
    first.close("FAILED")
    other = MlflowRun(uri, "exp", run_name="other", find_tags={"ioulab.sweep_id": "s2", "ray.trial_id": "t1"})
    other.close()  # same trial id in another sweep: a different run
    again = MlflowRun(uri, "exp", run_name="trial", find_tags=tags)
    assert again.reattached and again.run_id == first.run_id != other.run_id
    for step in (2, 3, 4, 5):
        again.log_metrics({"loss/total": 10.0 * step}, step)
    (tmp_path / "cfg.yaml").write_text("a: 1")
    again.log_artifact(tmp_path / "cfg.yaml", "config")
    again.close()
    client = MlflowClient(uri)
    history = sorted((m.step, m.value) for m in client.get_metric_history(first.run_id, "loss/total"))
    assert history == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
    assert [a.path for a in client.list_artifacts(first.run_id, "config")] == ["config/cfg.yaml"]
    assert client.get_run(first.run_id).info.status == "FINISHED"


def test_pending_records_move_to_another_process(tmp_path):
    """What a trial could not deliver travels in its checkpoint and is requeued by the next attempt."""
    dead = f"http://127.0.0.1:{_free_port()}"
    tags = {"ray.trial_id": "t9"}
    lost = MlflowRun(dead, "exp", run_name="trial", find_tags=tags, retry_seconds=0)
    lost.log_params({"a": 1})
    lost.log_metrics({"AP": 5.0}, 4)
    records = json.loads(json.dumps(lost.pending_records()))  # JSON round trip, as in a checkpoint
    assert [r["kind"] for r in records] == ["params", "metrics"]
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    later = MlflowRun(uri, "exp", run_name="trial", find_tags=tags)
    later.requeue(records)
    later.requeue(records)  # twice: still one value per step
    assert later.close()
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert run.data.params == {"a": "1"} and run.data.tags["ray.trial_id"] == "t9"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "AP")] == [(4, 5.0)]
