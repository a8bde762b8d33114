"""MLflow outages never kill training and lose nothing."""
import json
import os
import socket
import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from ioulab.platform import tracking
from ioulab.platform.tracking import MlflowRun, SpoolError, absolute_uri, replay_file, set_request_timeout


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
    assert replay_file(spool, live) == 0
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


def test_experiment_opens_on_the_runs_table_new_or_existing(tmp_path):
    """MLflow 3.17's UI opens an experiment without ``mlflow.experimentKind`` on its GenAI
    overview; ours are tagged custom_model_development, also one created before the tag."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    old = client.create_experiment("old")   # as MLflow (or an older ioulab) left it
    for name in ("new", "old"):
        run = MlflowRun(uri, name, run_name="r")
        run.log_metrics({"AP": 1.0}, 0)
        run.close()
        assert client.get_experiment_by_name(name).tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_experiment_by_name("old").experiment_id == old
    client.set_experiment_tag(old, "mlflow.experimentKind", "genai_development")  # a user's choice stays
    tracking.ensure_experiment(client, "old")
    assert client.get_experiment_by_name("old").tags["mlflow.experimentKind"] == "genai_development"


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


QUOTED = ["run'q", 'say "hi"', "both'and\"", "back\\slash\\", "x%_y", "a\\'b", "ünï cödé"]


def test_find_tags_work_with_any_value(tmp_path):
    """MLflow's filter language has no escapes: quotes in a run folder name used to break it."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    ids = {}
    for value in QUOTED:
        first = MlflowRun(uri, "exp", run_name="r", find_tags={"ioulab.run_dir": value})
        assert first.run_id is not None, value
        first.close()
        again = MlflowRun(uri, "exp", run_name="r", find_tags={"ioulab.run_dir": value})
        assert again.reattached and again.run_id == first.run_id, value
        again.close()
        ids[value] = first.run_id
    assert len(set(ids.values())) == len(QUOTED)
    # The LIKE fallback (both quote kinds) matches "_" for a quote: exact values still decide.
    near = MlflowRun(uri, "exp", run_name="r", find_tags={"ioulab.run_dir": "both_and_"})
    assert not near.reattached and near.run_id not in ids.values()
    near.close()


def test_train_command_finds_a_quoted_run_folder_again(tmp_path):
    """`ioulab train --out "run'q" --resume` used to print "MLflow run: None"."""
    import argparse

    from ioulab.platform.commands.train import open_run

    out = tmp_path / "run'q \"x\""
    args = argparse.Namespace(no_mlflow=False, tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", experiment="ioulab",
                              resume=True)
    tags = {"ioulab.run_dir": str(out)}
    first = open_run(args, out.name, out, tags)
    assert first.run_id is not None
    first.close("KILLED")
    again = open_run(args, out.name, out, tags)
    assert again.reattached and again.run_id == first.run_id
    again.close()


class HangingServer:
    """Accepts TCP connections on 127.0.0.1 and never answers (a wedged proxy or server)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.uri = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.held, self.stopped = [], threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.held.append(conn)  # keep it open, read nothing, answer nothing

    def close(self):
        self.stopped.set()
        self.thread.join(5)
        for conn in self.held:
            conn.close()
        self.sock.close()


class Timed:
    """A RunLogger wrapper recording how long each call blocked."""

    def __init__(self, inner):
        self.inner, self.durations = inner, []

    def __getattr__(self, name):
        method = getattr(self.inner, name)

        def call(*args, **kwargs):
            t0 = time.monotonic()
            try:
                return method(*args, **kwargs)
            finally:
                self.durations.append(time.monotonic() - t0)
        return call


@pytest.mark.timeout(900)  # trains (the extension build lock can be held by another build)
def test_hanging_server_blocks_training_at_most_the_timeout_per_attempt(tiny_cfg, tmp_path, monkeypatch):
    from ioulab.detector.engine.train import train

    timeout = 2
    for key in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES"):
        monkeypatch.setenv(key, os.environ.get(key, ""))  # restored after the test
    set_request_timeout(timeout)
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "2" and os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    server = HangingServer()
    try:
        spool = tmp_path / "run" / "mlflow_pending.jsonl"
        t0 = time.monotonic()
        # Retry soon (0.2 s, then doubling): a 6-iteration training can take under a second, and
        # the test needs at least one attempt while training runs.
        tracker = MlflowRun(server.uri, "exp", run_name="r", spool=spool, retry_seconds=0.2)
        connect = time.monotonic() - t0
        logger = Timed(tracker)
        result = train(tiny_cfg("train.max_iters=6"), tmp_path / "run", logger=logger, progress=False)
        t1 = time.monotonic()
        assert tracker.close() is False
        closing = time.monotonic() - t1
    finally:
        server.close()
    assert result.iterations == 6
    assert server.held, "the client never connected"
    # One attempt is one request (no client retry) bounded by the timeout; before, 2 x 5 s + backoff.
    slack = 1.5
    assert connect < timeout + slack and closing < timeout + slack
    assert max(logger.durations) < timeout + slack, logger.durations
    attempts = sum(d > timeout * 0.8 for d in logger.durations)
    assert attempts >= 1 and sum(logger.durations) < attempts * (timeout + slack)
    lines = [json.loads(x) for x in spool.read_text().splitlines()]
    assert lines[0]["header"]["tracking_uri"] == server.uri
    steps = sorted({r["payload"]["step"] for r in lines[1:] if r["kind"] == "metrics"})
    assert steps == [1, 2, 3, 4, 5, 6]  # nothing lost: every logged step is spooled
    assert {r["kind"] for r in lines[1:]} == {"params", "metrics", "artifact", "end"}


def test_set_request_timeout_rejects_nonsense():
    with pytest.raises(ValueError, match=">= 1"):
        set_request_timeout(0)


# -- hostile spool files: a spool never chooses the server nor uploads files outside its folder ---

def _spool(path, uri, artifacts=(), run_id=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"tracking_uri": uri, "experiment": "exp", "run_id": run_id, "run_name": "r",
              "tags": {"k": "v"}, "find_tags": {}}
    lines = [{"header": header}, {"kind": "metrics", "payload": {"values": {"AP": 1.0}, "step": 1, "timestamp": 0}}]
    lines += [{"kind": "artifact", "payload": str(a)} for a in artifacts]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _runs(uri):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("exp")
    return client, (client.search_runs([exp.experiment_id]) if exp else [])


def test_spool_naming_another_server_is_refused(tmp_path):
    live = f"sqlite:///{tmp_path / 'live.db'}"
    evil_db = tmp_path / "evil" / "collect.db"
    spool = _spool(tmp_path / "run" / "mlflow_pending.jsonl", f"sqlite:///{evil_db}")
    with pytest.raises(SpoolError, match=r"mlflow_pending\.jsonl:1: records for tracking URI .*collect\.db") as e:
        replay_file(spool, live)
    assert "\n" not in str(e.value)
    assert not evil_db.parent.exists() and not _runs(live)[1]


@pytest.mark.parametrize("where", ["outside", "symlink", "relative", "dotdot"])
def test_spool_uploading_files_outside_its_folder_is_refused(where, tmp_path):
    live = f"sqlite:///{tmp_path / 'live.db'}"
    run = tmp_path / "run"
    run.mkdir()
    secret = tmp_path / "home" / "id_rsa"
    secret.parent.mkdir()
    secret.write_text("PRIVATE KEY")
    target = {"outside": secret, "relative": "../home/id_rsa", "dotdot": run / ".." / "home" / "id_rsa",
              "symlink": run / "metrics.json"}[where]
    if where == "symlink":
        target.symlink_to(secret)
    spool = _spool(run / "mlflow_pending.jsonl", live, artifacts=[target])
    with pytest.raises(SpoolError, match=r"mlflow_pending\.jsonl:3: artifact .*(outside|not an absolute path)"):
        replay_file(spool, live)
    assert not _runs(live)[1]  # refused as a whole: nothing sent


def test_spool_uploads_files_of_its_run_folder(tmp_path):
    live = f"sqlite:///{tmp_path / 'live.db'}"
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text("{}")
    spool = _spool(run / "mlflow_pending.jsonl", live, artifacts=[run / "metrics.json"])
    assert replay_file(spool, live) == 0
    client, (r,) = _runs(live)
    assert r.data.metrics == {"AP": 1.0} and [a.path for a in client.list_artifacts(r.info.run_id)] == ["metrics.json"]


def test_replay_command_uses_its_own_tracking_uri(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    elsewhere = f"sqlite:///{tmp_path / 'other.db'}"
    spool = _spool(tmp_path / "run" / "mlflow_pending.jsonl", elsewhere)
    assert tracking._main([str(spool)]) == 2  # default URI: ./mlflow.db, not the file's
    err = capsys.readouterr().err
    assert err.startswith("ioulab: error: ") and err.count("\n") == 1 and "other.db" in err
    assert tracking._main([str(spool), "--tracking-uri", elsewhere]) == 0  # the user chose it
    assert _runs(elsewhere)[1]


def test_spooled_trial_artifacts_are_copied_into_the_spool_folder(tmp_path):
    """A Ray trial's files live in its working directory, outside the sweep folder: the spool
    carries copies, so the driver's replay needs nothing from outside that folder."""
    sweep = tmp_path / "ray_results" / "sw"
    workdir = tmp_path / "session" / "working_dirs" / "trial_1" / "run"
    workdir.mkdir(parents=True)
    (workdir / "config.yaml").write_text("a: 1")
    spool = sweep / "mlflow_spool" / "t1-abc.jsonl"
    dead = f"http://127.0.0.1:{_free_port()}"
    lost = MlflowRun(dead, "exp", run_name="trial", spool=spool, retry_seconds=0)
    lost.log_artifact(workdir / "config.yaml")
    assert lost.close() is False
    (copied,) = (sweep / "mlflow_spool" / "t1-abc.files").rglob("config.yaml")
    assert copied.read_text() == "a: 1"
    live = f"sqlite:///{tmp_path / 'live.db'}"
    lines = [json.loads(x) for x in spool.read_text().splitlines()]
    lines[0]["header"]["tracking_uri"] = live
    spool.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert replay_file(spool, live, root=sweep) == 0
    client, (r,) = _runs(live)
    assert [a.path for a in client.list_artifacts(r.info.run_id)] == ["config.yaml"]


def test_sweep_finalize_refuses_hostile_spool_files(tmp_path, capsys):
    from ioulab.platform.sweep.finalize import _replay_spools

    live = f"sqlite:///{tmp_path / 'live.db'}"
    root = tmp_path / "ray_results" / "sw"
    (root / "train").mkdir(parents=True)
    (root / "train" / "metrics.json").write_text("{}")
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cr3t")
    good = _spool(root / "mlflow_spool" / "good.jsonl", live, artifacts=[root / "train" / "metrics.json"])
    steal = _spool(root / "mlflow_spool" / "steal.jsonl", live, artifacts=[secret])
    redirect = _spool(root / "mlflow_spool" / "redirect.jsonl", "http://attacker.example:80")
    assert _replay_spools(str(root), live, time.monotonic() + 5) is False
    err = capsys.readouterr().err
    assert "steal.jsonl:3: artifact" in err and "redirect.jsonl:1: records for tracking URI" in err
    assert not good.exists() and steal.exists() and redirect.exists()  # refused files stay, for a human
    client, runs = _runs(live)
    assert len(runs) == 1 and [a.path for a in client.list_artifacts(runs[0].info.run_id)] == ["metrics.json"]


def test_mlflow_timeout_option(tmp_path, monkeypatch):
    from ioulab.platform.cli import build_parser
    from ioulab.platform.commands.train import open_run

    for key in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES"):
        monkeypatch.setenv(key, os.environ.get(key, ""))  # restored after the test
    argv = ["train", "--mlflow-timeout", "3", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]
    args = build_parser(argv).parse_args(argv)
    assert args.mlflow_timeout == 3
    open_run(args, "r", tmp_path / "r", {}).close()
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "3" and os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    for bad in ("0", "-1", "soon"):
        with pytest.raises(SystemExit):
            build_parser(["train"]).parse_args(["train", "--mlflow-timeout", bad])


@pytest.mark.parametrize("text", ['{"header": {"tracking_uri": "URI"}}', "not json", '{"kind": "metrics"}',
                                  '{"header": {"tracking_uri": "URI", "experiment": "e", "tags": []}}'])
def test_malformed_spool_is_a_one_line_error(text, tmp_path):
    live = f"sqlite:///{tmp_path / 'live.db'}"
    spool = tmp_path / "run" / "mlflow_pending.jsonl"
    spool.parent.mkdir()
    spool.write_text(text.replace("URI", live) + "\n")
    with pytest.raises(SpoolError, match=r"mlflow_pending\.jsonl:1: ") as e:
        replay_file(spool, live)
    assert "\n" not in str(e.value)
