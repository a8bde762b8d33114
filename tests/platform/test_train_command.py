"""`ioulab train` / `ioulab eval` end to end through the console script, logging to MLflow."""
import json
import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import TINY_OVERRIDES


def _ioulab(*args, cwd, env=None):
    exe = [sys.executable, "-m", "ioulab.platform.cli"]
    return subprocess.run(exe + list(args), cwd=cwd, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, TQDM_DISABLE="1", **(env or {})))


@pytest.mark.slow
def test_train_then_eval_logs_to_sqlite_mlflow(synth_root, tmp_path):
    sets = [a for o in TINY_OVERRIDES for a in ("--set", o)]
    out = _ioulab("train", "--set", f"data.root={synth_root}", *sets, "--out", "run", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "run"
    for name in ("metrics.json", "detections.json", "config.yaml", "checkpoints/model_0000004.pth"):
        assert (run / name).exists(), name
    # Default tracking URI: an SQLite file in the working directory.
    db = tmp_path / "mlflow.db"
    assert db.exists() and f"sqlite:///{db}" in out.stdout
    client = MlflowClient(f"sqlite:///{db}")
    (mlrun,) = client.search_runs([client.get_experiment_by_name("ioulab").experiment_id])
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.params["model.backbone.name"] == "tiny"
    metrics = json.loads((run / "metrics.json").read_text())
    assert mlrun.data.metrics["AP50"] == pytest.approx(metrics["AP50"])
    assert len(client.get_metric_history(mlrun.info.run_id, "loss/total")) == 4
    arts = {a.path for a in client.list_artifacts(mlrun.info.run_id)}
    assert {"config.yaml", "metrics.json"} <= arts

    ev = _ioulab("eval", "--checkpoint", str(run / "checkpoints" / "model_0000004.pth"),
                 "--set", "inference.nms.type=diou", "--out", "ev", "--no-mlflow", cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert set(json.loads((tmp_path / "ev" / "metrics.json").read_text())) == set(metrics)
    lines = ev.stdout.splitlines()   # the AP line, then where the AP goes
    ap_line = next(i for i, line in enumerate(lines) if line.startswith("AP "))
    assert lines[ap_line + 1].startswith("COCO error analysis (AP): C75") and "err/" not in lines[ap_line]
    assert lines[ap_line + 2].startswith("ΔAP50 if fixed [count]:")

    bad = _ioulab("train", "--set", "model.rpn.nms_thres=0.5", "--no-mlflow", cwd=tmp_path)
    assert bad.returncode != 0 and "model.rpn.nms_thresh" in bad.stderr


def test_print_errors_after_the_metrics(tmp_path, capsys):
    """What `ioulab eval` prints from the evaluation's errors.json (none written: nothing printed)."""
    from ioulab.detector.engine import erroranalysis
    from ioulab.platform.commands.train import print_errors, print_metrics
    from tests.detector.engine.test_erroranalysis import handmade

    analysis = erroranalysis.analyze(*handmade())
    erroranalysis.write(tmp_path, analysis)
    print_metrics({"AP": 40.0, **analysis.metrics()})
    print_errors(tmp_path)
    print_errors(tmp_path / "missing")
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "AP 40.0" and len(out) == 3
    assert out[1] == "COCO error analysis (AP): " + "  ".join(f"{k} {v:.1f}" for k, v in analysis.coco.items())
    assert f"loc +{analysis.tide_delta['loc']:.1f} [1]" in out[2] and "miss +" in out[2]
