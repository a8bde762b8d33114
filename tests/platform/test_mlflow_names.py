"""The MLflow naming contract (platform/mlflow_names.py): the tag strings live in that module only,
and the tags it builds are the ones runs stored before it existed carry (literal strings here on
purpose: they are the contract that reports read back)."""
import ast
import json
import re
from pathlib import Path
from types import SimpleNamespace

from ioulab.platform import mlflow_names as names
from ioulab.platform import tracking

REPO = Path(__file__).resolve().parents[2]
CONTRACT = REPO / "platform" / "mlflow_names.py"
# A tag key in a string: ioulab.<key> (not a module path), MLflow's and Ray's keys the contract uses.
TAG = re.compile(r"(?<![\w.])ioulab\.(?!(?:detector|platform|csrc)\b)\w|mlflow\.(?:parentRunId|note\.)|ray\.trial_id")
NOT_TAGS = {"ioulab.lock", "ioulab.lock.owner"}  # detector/ops/build.py: the PrRoIPool build lock files


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def tag_literals(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string literal (f-string parts included, docstrings not) naming a tag."""
    tree = ast.parse(path.read_text())
    skip = _docstrings(tree)
    return sorted((node.lineno, node.value) for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip
                  and node.value not in NOT_TAGS and TAG.search(node.value))


def test_tag_strings_live_in_the_naming_module_only():
    sources = [p for folder in ("platform", "detector") for p in sorted((REPO / folder).rglob("*.py"))]
    assert CONTRACT in sources and len(sources) > 50
    found = {f"{p.relative_to(REPO)}:{line}": text for p in sources if p != CONTRACT
             for line, text in tag_literals(p)}
    assert not found, f"MLflow tag strings outside platform/mlflow_names.py: {found}"
    assert tag_literals(CONTRACT)  # the scan does see them where they belong


def test_the_scan_catches_tag_strings(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('"""ioulab.role in a docstring is fine."""\n'
                   'A = {"ioulab.role": "trial"}\nB = f"tags.`ioulab.sweep_id` = {1}"\nC = "ray.trial_id"\n'
                   'D = "ioulab.platform.tracking"\nE = "mlflow.parentRunId"\n')
    assert [line for line, _ in tag_literals(bad)] == [2, 3, 4, 6]


def test_trial_tags_are_the_stored_contract():
    created = names.trial_tags("s", "eval", label="nms.beta=0.6", index=3, overrides={"b": 1, "a": 2},
                               status="RUNNING", parent_run_id="p" * 32)
    assert created == {"ioulab.role": "trial", "ioulab.sweep": "s", "ioulab.stage": "eval",
                       "ioulab.point": json.dumps({"a": 2, "b": 1}), "ioulab.label": "nms.beta=0.6",
                       "ioulab.point_index": "3", "ioulab.trial_status": "RUNNING", "mlflow.parentRunId": "p" * 32}
    assert names.trial_tags("s", "train") == {"ioulab.role": "trial", "ioulab.sweep": "s", "ioulab.stage": "train"}
    assert names.trial_key("sid", "t1") == {"ioulab.sweep_id": "sid", "ray.trial_id": "t1"}
    assert names.placement_tags("n1", "cpu", "", 0.25) == {"ioulab.node_id": "n1", "ioulab.device": "cpu",
                                                           "ioulab.gpu_ids": "", "ioulab.gpu_share": "0.25"}
    assert names.status_tag("FAILED") == {"ioulab.trial_status": "FAILED"}


def test_parent_and_command_tags():
    plan = SimpleNamespace(name="n", space_file="s.yaml", varying_keys=["k"], baseline={"k": 1}, metric="AP",
                           mode="max", result_stage="train", profile=None, description="why",
                           paper=SimpleNamespace(to_json=lambda: {"source": "x", "rows": []}))
    assert names.sweep_tags(plan, "/r", "abc") == {
        "ioulab.role": "sweep", "ioulab.sweep": "n", "ioulab.space_file": "s.yaml", "ioulab.git_commit": "abc",
        "ioulab.varying_keys": '["k"]', "ioulab.baseline": '{"k": 1}', "ioulab.metric": "AP", "ioulab.mode": "max",
        "ioulab.result_stage": "train", "ioulab.storage": "/r", "ioulab.profile": "",
        "mlflow.note.content": "why", "ioulab.paper": '{"source": "x", "rows": []}'}
    assert names.sweep_key("sid") == {"ioulab.sweep_id": "sid", "ioulab.role": "sweep"}
    assert names.summary_tags({"FINISHED": 2, "FAILED": 0}, "t", None, "a") == {
        "ioulab.trials_finished": "2", "ioulab.trials_failed": "0", "ioulab.best_trial_id": "t",
        "ioulab.best_run_id": "", "ioulab.best_label": "a"}
    assert names.summary_tags({"STOPPED": 1}) == {"ioulab.trials_stopped": "1"}
    assert names.command_tags("train", run_dir="/o", config="cpu_tiny") == {
        "ioulab.run_dir": "/o", "ioulab.command": "train", "ioulab.config": "cpu_tiny"}
    assert names.command_tags("eval", checkpoint="/m.pth") == {"ioulab.command": "eval", "ioulab.checkpoint": "/m.pth"}


def test_metric_names_and_filters():
    assert names.best_metrics({"AP": 1.0, "loss/total": 2.0}) == {"best/AP": 1.0}
    assert names.is_loss("loss/iou") and not names.is_loss("AP")
    # the detector writes the forward-time metric under the same name (it does not import the platform)
    from ioulab.detector.engine import timing

    assert names.INFER_MS_PER_IMAGE == timing.INFER_MS_PER_IMAGE == "time/infer_ms_per_image"
    assert names.is_timing(names.INFER_MS_PER_IMAGE) and not names.is_timing("AP")
    assert names.tag_filter({names.SWEEP_ID: "s1", names.ROLE: names.ROLE_TRIAL}) == \
        "tags.`ioulab.sweep_id` = 's1' and tags.`ioulab.role` = 'trial'"


def test_tracking_uri_fallback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert names.resolve_tracking_uri(None) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert names.resolve_tracking_uri(None) == f"sqlite:///{tmp_path.resolve() / 'env.db'}"
    assert names.resolve_tracking_uri("http://h:5000") == "http://h:5000"
    assert names.resolve_tracking_uri("store") == (tmp_path / "store").resolve().as_uri()
    # tracking.py serves the same functions (its callers and its replay command)
    assert tracking.absolute_uri is names.absolute_uri and tracking.default_tracking_uri is names.default_tracking_uri
